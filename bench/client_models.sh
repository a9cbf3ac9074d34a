#!/usr/bin/env bash
# cachefence benchmark, client models: consistency and cost of the
# cache-aside workload of issue 14 per CLIENT MODEL (one connection per
# thread, a shared pool, one shared connection), against direct Redis (the
# control) and cachefence with ticket_scope = "client" (the default) and
# "connection". With CM_REPLICA_DELAY (#16), against a PostgreSQL primary and
# a lagging streaming replica of its own, and two more targets: cachefence
# with lag_window = "1s" (cf-lag1s) and lag_window = "auto" (cf-auto).
#
# Each cell (target x model) gets a fresh scratch redis-server (CPU 0) and,
# for the cachefence targets, a fresh proxy in front of it (CPU 1, with the
# driver, --workers 1); bench/client_models.py runs the workload against a
# scratch PostgreSQL schema cm_<pid> (dropped on exit) and prints one JSON
# object per cell. The raw objects go to $CM_OUT/cm-<tag>-<target>-<model>.txt,
# the proxy's log to $CM_OUT/cm-proxy-<tag>-<target>-<model>.log and the
# report to $CM_OUT/cm-<tag>-table.txt (and stdout).
#
# Only loopback addresses are used; everything started here is stopped on
# exit. Exit status: 0 when every cell ran without errors, 1 otherwise.
# See bench/README.md, "Client models".

set -euo pipefail

# ---------------------------------------------------------------- settings
CELL_SECONDS=${CM_SECONDS:-20}
TARGETS=(${CM_TARGETS:-redis cf-client cf-connection})
MODELS=(${CM_MODELS:-thread pool fairpool mux})
TAG=${CM_TAG:-$(date +%Y%m%d-%H%M%S)}
OUT=${CM_OUT:-/tmp}
PG_URL=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
SERVER_CPU=${BENCH_SERVER_CPU:-0}
CLIENT_CPU=${BENCH_CLIENT_CPU:-1}
VENV=${CM_VENV:-${TMPDIR:-/tmp}/cachefence-cm-venv}
# Extra arguments for `client_models.py run` (e.g. "--write-pause 0 --pool-size 4").
DRIVER_ARGS=(${CM_DRIVER_ARGS:-})
# Replica lag (#16): with CM_REPLICA_DELAY (e.g. 300ms), a PostgreSQL primary
# and a streaming replica of the script's own, the replica applying each
# change that long after its commit; readers read it on half their misses,
# and stale reads are also counted past CM_WINDOW seconds. Targets cf-lag1s
# (lag_window = "1s") and cf-auto (lag_window = "auto") need it.
REPLICA_DELAY=${CM_REPLICA_DELAY:-}
WINDOW=${CM_WINDOW:-1.0}

HOST=127.0.0.1
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

log() { printf '[client-models] %s\n' "$*" >&2; }
die() { printf '[client-models] ERROR: %s\n' "$*" >&2; exit 1; }

case "$PG_URL" in
    postgres://*@127.0.0.1[:/]* | postgresql://*@127.0.0.1[:/]* | postgres://*@localhost[:/]*) ;;
    *) die "BENCH_PG_URL must point at a loopback PostgreSQL: $PG_URL" ;;
esac
for m in "${MODELS[@]}"; do
    case $m in thread | pool | fairpool | mux) ;; *) die "unknown client model '$m' (thread, pool, fairpool, mux)" ;; esac
done
for t in "${TARGETS[@]}"; do
    case $t in
        redis | cf-client | cf-connection) ;;
        cf-lag1s | cf-auto) [ -n "$REPLICA_DELAY" ] || die "target $t needs CM_REPLICA_DELAY (a replica)" ;;
        *) die "unknown target '$t' (redis, cf-client, cf-connection, cf-lag1s, cf-auto)" ;;
    esac
done

# ------------------------------------------------------------ dependencies
# shellcheck source=../scripts/lib.sh
source "$REPO_ROOT/scripts/lib.sh"
ensure_installed redis-server redis-server redis-tools
ensure_installed redis-cli redis-tools
ensure_installed psql postgresql-client
command -v taskset >/dev/null 2>&1 || die "taskset (util-linux) not found"
if [ "$PG_URL" = postgres://postgres@127.0.0.1:5432/test ]; then
    ensure_postgres
fi
psql "$PG_URL" -qAtc 'select 1' >/dev/null || die "PostgreSQL at $PG_URL does not answer"

PY=$VENV/bin/python
if ! "$PY" -c 'import redis, psycopg' 2>/dev/null; then
    BASE_PY=$(command -v python3.11 || command -v python3) || die "python3 not found"
    log "creating $VENV (pip install -r bench/requirements-client-models.txt)"
    "$BASE_PY" -m venv "$VENV" || die "python venv failed (apt-get install python3-venv?)"
    "$VENV/bin/pip" install -q -r "$SCRIPT_DIR/requirements-client-models.txt" >&2 || die "pip install failed"
fi


WORK_PREFIX=cachefence-cm
# shellcheck source=lib.sh
source "$SCRIPT_DIR/lib.sh"
find_cachefence

# The scratch schema goes on every exit, before lib.sh's cleanup stops the servers.
SCHEMA=cm_$$
drop_schema() { psql "$PG_URL" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true; }
trap 'rc=$?; drop_schema; [ -z "$REPLICA_DELAY" ] || stop_pg_pair; (exit $rc); cleanup' EXIT

# A primary and a lagging replica of our own (stopped on exit), instead of
# the shared server.
REPLICA_ARGS=()
if [ -n "$REPLICA_DELAY" ]; then
    source "$SCRIPT_DIR/pg_replica.sh"
    start_pg_pair "$WORK/pg" "$REPLICA_DELAY"
    PG_URL=$PG_PRIMARY_URL
    REPLICA_ARGS=(--replica-url "$PG_REPLICA_URL" --window "$WINDOW")
    log "PostgreSQL primary $PG_PRIMARY_URL, replica $PG_REPLICA_URL (apply delay $REPLICA_DELAY)"
fi

psql "$PG_URL" -qc "CREATE SCHEMA $SCHEMA" || die "cannot create schema $SCHEMA"

# Every key of the workload is a cache, at the defaults (ticket_scope =
# "client", on_write = "invalidate"); the "connection" variant changes the scope.
printf '[[cache]]\npattern = "*"\n' >"$WORK/client.toml"
printf '[[cache]]\npattern = "*"\nticket_scope = "connection"\n' >"$WORK/connection.toml"
CONFIGS=(client connection)
if [ -n "$REPLICA_DELAY" ]; then
    printf '[[cache]]\npattern = "*"\nlag_window = "1s"\n' >"$WORK/lag1s.toml"
    printf '[[cache]]\npattern = "*"\nlag_window = "auto"\n\n[postgres]\nurl = "%s"\nreplicas = ["%s"]\n' \
        "$PG_PRIMARY_URL" "$PG_REPLICA_URL" >"$WORK/auto.toml"
    CONFIGS+=(lag1s auto)
fi
for f in "${CONFIGS[@]}"; do
    "$CACHEFENCE" --check --config "$WORK/$f.toml" >/dev/null || die "config check failed ($f.toml)"
done

stop_pid() { # SIGTERM, up to 15 s, then SIGKILL; only the pid given
    kill "$1" 2>/dev/null || return 0
    local i
    for i in $(seq 1 150); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

FAILED=0
FILES=()
load1=$(cut -d' ' -f1 /proc/loadavg)
log "tag $TAG: targets ${TARGETS[*]}; models ${MODELS[*]}; ${CELL_SECONDS}s per cell; load $load1"

run_cell() { # run_cell TARGET MODEL
    local target=$1 model=$2 rc=0
    local raw=$OUT/cm-$TAG-$target-$model.txt plog=$OUT/cm-proxy-$TAG-$target-$model.log
    local redis_pid proxy_pid="" port

    free_port; local redis_port=$FREE_PORT
    mkdir -p "$WORK/redis-$target-$model"
    taskset -c "$SERVER_CPU" redis-server --bind "$HOST" --port "$redis_port" --save "" --appendonly no \
        --dir "$WORK/redis-$target-$model" --logfile "$WORK/redis-$target-$model.log" --daemonize no &
    redis_pid=$!
    PIDS=("$redis_pid")
    wait_port "$redis_port" "$redis_pid" || die "redis-server did not start"
    port=$redis_port

    if [ "$target" != redis ]; then
        free_port; port=$FREE_PORT
        local cfg=(--config "$WORK/${target#cf-}.toml")
        taskset -c "$CLIENT_CPU" "$CACHEFENCE" --listen "$HOST:$port" --upstream "$HOST:$redis_port" \
            --workers 1 "${cfg[@]}" 2>"$plog" &
        proxy_pid=$!
        PIDS+=("$proxy_pid")
        wait_port "$port" "$proxy_pid" || { cat "$plog" >&2; die "cachefence did not start"; }
        if [ "$target" = cf-auto ]; then
            # lag_window = "auto" refuses fills inside the ceiling until the
            # lag has been measured for lease_ttl (10 s): the timed part
            # starts after, as a proxy that has been running would be.
            local i
            for i in $(seq 1 300); do
                redis-cli -h "$HOST" -p "$port" CACHE.INFO | grep -q '^lag_window_measured_ms:[0-9]' && break
                sleep 0.1
            done
            redis-cli -h "$HOST" -p "$port" CACHE.INFO | grep '^lag_window_measured_ms:' >&2
        fi
    fi

    log "$target / $model: redis :$redis_port${proxy_pid:+, cachefence :$port}"
    local proxy_flag=()
    [ "$target" != redis ] && proxy_flag=(--proxy)
    taskset -c "$CLIENT_CPU" timeout --foreground $((${CELL_SECONDS%.*} + 240)) "$PY" "$SCRIPT_DIR/client_models.py" run \
        --port "$port" --admin-port "$redis_port" --label "$target" --model "$model" "${proxy_flag[@]}" \
        --pg-url "$PG_URL" --schema "$SCHEMA" --seconds "$CELL_SECONDS" "${REPLICA_ARGS[@]}" "${DRIVER_ARGS[@]}" \
        >"$raw" 2>"$WORK/driver-$target-$model.err" || rc=$?
    if [ "$rc" -ne 0 ]; then
        FAILED=1
        log "  driver exit status $rc"
        sed 's/^/[client-models]   | /' "$WORK/driver-$target-$model.err" | tail -20 >&2 || true
    fi
    if [ -n "$proxy_pid" ]; then
        kill -0 "$proxy_pid" 2>/dev/null || { FAILED=1; log "  cachefence is no longer running"; }
        stop_pid "$proxy_pid"
        local warn
        warn=$(grep -cE ' (WARN|ERROR) ' "$plog" || true)
        [ "$warn" -eq 0 ] || log "  cachefence log: $warn WARN/ERROR lines ($plog)"
    fi
    stop_pid "$redis_pid"
    PIDS=()
    [ -s "$raw" ] && FILES+=("$raw")
}

for target in "${TARGETS[@]}"; do
    for model in "${MODELS[@]}"; do
        run_cell "$target" "$model"
    done
done

[ "${#FILES[@]}" -gt 0 ] || die "no cell produced a result"
{
    echo "client models  tag $TAG  ($(date -u '+%Y-%m-%d %H:%M:%SZ'), $(nproc) CPUs, redis on CPU $SERVER_CPU," \
        "cachefence+driver on CPU $CLIENT_CPU, ${CELL_SECONDS}s per cell, load before: $load1)"
    "$PY" "$SCRIPT_DIR/client_models.py" table "${FILES[@]}"
} | tee "$OUT/cm-$TAG-table.txt"
exit "$FAILED"
