#!/usr/bin/env bash
# cachefence benchmark, change-log section: how long after a PostgreSQL
# COMMIT the mapped Redis key is gone.
#
# Starts its own scratch redis-server (CPU 0, notify-keyspace-events Kg),
# creates a scratch schema in PostgreSQL (table items(id int primary key,
# n int) with --rows rows), writes a config mapping <schema>.items to
# keys item:{id}, runs `cachefence pg install` and then, for each variant,
# a release cachefence with that config in front of the scratch Redis
# (CPU 1, with the driver):
#   notify  the proxy LISTENs on the channel the triggers NOTIFY (and polls);
#   poll    the proxy LISTENs on another channel, so only its poll every
#           poll_interval finds the outbox rows (the fallback when NOTIFY
#           is lost).
# The driver (bench/changelog_latency.py, Python stdlib) SETs item:<id> in
# Redis, then runs UPDATE items SET n = n + 1 WHERE id = <id> (autocommit)
# at --rate per second, and measures from the COMMIT's return to the `del`
# keyspace event of item:<id> (PSUBSCRIBE __keyspace@0__:item:*).
#
# Usage: bash bench/changelog.sh [--seconds 30] [--rate 200] [--poll-seconds 15]
#            [--poll-interval 1s] [--rows 1000] [--conns 4] [--variants notify,poll]
# Everything started here runs under nice -n 10 and is stopped on exit; the
# scratch schema is dropped on exit (also on error or Ctrl-C). Exit status:
# 0 when every variant ran and no invalidation was missing, 1 otherwise.
# See bench/README.md.

set -euo pipefail

# ---------------------------------------------------------------- settings
SECONDS_RUN=30
RATE=200
POLL_SECONDS=15
POLL_INTERVAL=1s
ROWS=1000
CONNS=4
VARIANTS=notify,poll
SERVER_CPU=${BENCH_SERVER_CPU:-0}
CLIENT_CPU=${BENCH_CLIENT_CPU:-1}
PG_URL=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
NICE=${BENCH_NICE:-10}

usage() { sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_RUN=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --poll-seconds) POLL_SECONDS=$2; shift 2 ;;
        --poll-interval) POLL_INTERVAL=$2; shift 2 ;;
        --rows) ROWS=$2; shift 2 ;;
        --conns) CONNS=$2; shift 2 ;;
        --variants) VARIANTS=$2; shift 2 ;;
        -h | --help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done

HOST=127.0.0.1
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

log() { printf '[changelog] %s\n' "$*" >&2; }
die() { printf '[changelog] ERROR: %s\n' "$*" >&2; exit 1; }

for n in "$SECONDS_RUN" "$RATE" "$POLL_SECONDS" "$ROWS" "$CONNS"; do
    [[ "$n" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "not a number: $n"
done
[[ "$POLL_INTERVAL" =~ ^[0-9]+(\.[0-9]+)?(ms|s)$ ]] || die "--poll-interval: expected e.g. 1s or 500ms, got $POLL_INTERVAL"
POLL_MS=$(awk -v v="$POLL_INTERVAL" 'BEGIN { if (v ~ /ms$/) print v + 0; else print (v + 0) * 1000 }')
# The grace period for late events: several polls, at least 5 s.
GRACE=$(awk -v p="$POLL_MS" 'BEGIN { g = 3 * p / 1000 + 2; if (g < 5) g = 5; print g }')

# ------------------------------------------------------------ dependencies
# shellcheck source=../scripts/lib.sh
source "$REPO_ROOT/scripts/lib.sh"

ensure_installed redis-server redis-server redis-tools
ensure_installed redis-cli redis-tools
ensure_installed psql postgresql-client
command -v python3 >/dev/null 2>&1 || die "python3 not found (needed for bench/changelog_latency.py)"
command -v taskset >/dev/null 2>&1 || die "taskset (util-linux) not found"
if [ "$PG_URL" = postgres://postgres@127.0.0.1:5432/test ]; then
    ensure_postgres || die "PostgreSQL is not reachable at $PG_URL"
fi
CPUS=$(nproc)
if [ "$SERVER_CPU" -ge "$CPUS" ] || [ "$CLIENT_CPU" -ge "$CPUS" ]; then
    die "need CPUs $SERVER_CPU and $CLIENT_CPU but only $CPUS online (set BENCH_SERVER_CPU/BENCH_CLIENT_CPU)"
fi
RUN=(nice -n "$NICE")

CACHEFENCE=${CACHEFENCE_BIN:-}
if [ -z "$CACHEFENCE" ]; then
    if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
        log "cargo build --release"
        (cd "$REPO_ROOT" && "${RUN[@]}" cargo build --release --quiet) >&2 || die "cargo build --release failed"
    fi
    CACHEFENCE=$REPO_ROOT/target/release/cachefence
fi
[ -x "$CACHEFENCE" ] || die "$CACHEFENCE not found"

WORK_PREFIX=cachefence-changelog
# shellcheck source=lib.sh
source "$SCRIPT_DIR/lib.sh"

# Exit: stop the proxy, drop the scratch schema, then lib.sh's cleanup (the
# other processes, the temp dir; it keeps the exit status).
SCHEMA=cf_bench_$$_$RANDOM
SCHEMA_CREATED=0
PROXY_PID=""
PSQL() { psql "$PG_URL" -X -q -A -t -v ON_ERROR_STOP=1 "$@"; }
stop_proxy() {
    if [ -n "$PROXY_PID" ]; then
        kill "$PROXY_PID" 2>/dev/null || true
        wait "$PROXY_PID" 2>/dev/null || true
        PROXY_PID=""
    fi
}
on_exit() {
    local rc=$?
    set +e
    trap - EXIT
    stop_proxy
    if [ "$SCHEMA_CREATED" = 1 ]; then
        if PSQL -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1; then
            log "dropped schema $SCHEMA"
        else
            log "WARNING: could not drop schema $SCHEMA (drop it by hand)"
        fi
    fi
    (exit "$rc")
    cleanup
}
trap on_exit EXIT

# --------------------------------------------------------------- start up
free_port; REDIS_PORT=$FREE_PORT
log "starting redis-server on $HOST:$REDIS_PORT (CPU $SERVER_CPU, notify-keyspace-events Kg)"
mkdir -p "$WORK/redis"
"${RUN[@]}" taskset -c "$SERVER_CPU" redis-server --bind "$HOST" --port "$REDIS_PORT" \
    --save "" --appendonly no --dir "$WORK/redis" --protected-mode yes \
    --notify-keyspace-events Kg --logfile "$WORK/redis.log" --daemonize no &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_port "$REDIS_PORT" "$REDIS_PID" || { cat "$WORK/redis.log" >&2 || true; die "redis-server did not start"; }
R() { redis-cli -h "$HOST" -p "$REDIS_PORT" "$@"; }
[ "$(R ping)" = PONG ] || die "redis-server does not answer PING"

log "creating schema $SCHEMA ($ROWS rows in $SCHEMA.items) in $PG_URL"
SCHEMA_CREATED=1
PSQL -c "CREATE SCHEMA $SCHEMA" \
    -c "CREATE TABLE $SCHEMA.items (id int PRIMARY KEY, n int NOT NULL DEFAULT 0)" \
    -c "INSERT INTO $SCHEMA.items (id, n) SELECT g, 0 FROM generate_series(1, $ROWS) g" \
    -c "VACUUM ANALYZE $SCHEMA.items" >/dev/null || die "cannot create the scratch schema"

write_config() { # write_config FILE CHANNEL
    cat >"$1" <<EOF
[postgres]
url = "$PG_URL"
outbox = "$SCHEMA.outbox"
channel = "$2"
poll_interval = "$POLL_INTERVAL"

[[postgres.table]]
table = "$SCHEMA.items"
keys = ["item:{id}"]

[[cache]]
pattern = "item:*"
EOF
}
CONFIG_NOTIFY=$WORK/notify.toml
CONFIG_POLL=$WORK/poll.toml
write_config "$CONFIG_NOTIFY" "$SCHEMA"
# The triggers NOTIFY channel $SCHEMA (installed with the config above);
# nothing ever notifies this one, so that proxy only polls.
write_config "$CONFIG_POLL" "${SCHEMA}_unused"

log "cachefence pg install --config $CONFIG_NOTIFY"
"$CACHEFENCE" pg install --config "$CONFIG_NOTIFY" >&2 || die "cachefence pg install failed"

start_proxy() { # start_proxy CONFIG LABEL: sets PROXY_PID, PROXY_PORT
    free_port; PROXY_PORT=$FREE_PORT
    log "starting cachefence ($2) on $HOST:$PROXY_PORT (CPU $CLIENT_CPU, --workers 1, $1)"
    "${RUN[@]}" taskset -c "$CLIENT_CPU" "$CACHEFENCE" --config "$1" --listen "$HOST:$PROXY_PORT" \
        --upstream "$HOST:$REDIS_PORT" --workers 1 --log-level info >"$WORK/cachefence-$2.log" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_port "$PROXY_PORT" "$PROXY_PID" || { cat "$WORK/cachefence-$2.log" >&2 || true; die "cachefence ($2) did not start"; }
}
stat_field() { # stat_field NAME: a field of the proxy's CACHE.STATS
    redis-cli -h "$HOST" -p "$PROXY_PORT" cache.stats 2>/dev/null |
        awk -v f="$1" 'prev == f { print; found = 1; exit } { prev = $0 } END { if (!found) print "" }'
}

FAILED=0
load1=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)
if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
    log "WARNING: load average is $load1 before starting; other work on this machine will make the numbers noisy"
fi
declare -A RES  # "variant|key" -> value printed by the driver (plus proxy stats)

run_variant() { # run_variant VARIANT SECONDS CONFIG
    local variant=$1 secs=$2 config=$3 out="$WORK/$1.out" err="$WORK/$1.err" rc=0 k v problem=""
    k=$(PSQL -c "SELECT count(*) FROM $SCHEMA.outbox")
    [ "$k" = 0 ] || log "WARNING: $k rows in the outbox before the $variant run (the proxy consumes them first)"
    R flushall >/dev/null
    start_proxy "$config" "$variant"
    log "$variant: ${RATE} updates/s for ${secs}s (grace ${GRACE}s)"
    "${RUN[@]}" taskset -c "$CLIENT_CPU" timeout "$(awk -v s="$secs" -v g="$GRACE" 'BEGIN { print int(s + 2 * g + 60) }')" \
        python3 "$SCRIPT_DIR/changelog_latency.py" --pg-url "$PG_URL" --table "$SCHEMA.items" \
        --outbox "$SCHEMA.outbox" --redis-host "$HOST" --redis-port "$REDIS_PORT" --ids "$ROWS" \
        --seconds "$secs" --rate "$RATE" --conns "$CONNS" --grace "$GRACE" \
        --raw "$WORK/$variant.csv" >"$out" 2>"$err" || rc=$?
    sed 's/^/  /' "$err" >&2 || true
    [ "$rc" -eq 0 ] || problem="changelog_latency.py exited with status $rc"
    kill -0 "$PROXY_PID" 2>/dev/null || problem="${problem:+$problem; }cachefence is no longer running"
    while IFS='=' read -r k v; do
        [ -n "$k" ] && RES["$variant|$k"]=$v
    done <"$out"
    [ -n "${RES["$variant|lat_p50"]:-}" ] || problem="${problem:+$problem; }no result"
    for k in changelog_rows_consumed changelog_retries; do
        RES["$variant|$k"]=$(stat_field "$k")
    done
    sed -i 's/\x1b\[[0-9;]*m//g' "$WORK/cachefence-$variant.log"  # colour codes
    RES["$variant|warnings"]=$(grep -c -E ' (WARN|ERROR) ' "$WORK/cachefence-$variant.log" || true)
    if [ "${RES["$variant|warnings"]}" != 0 ]; then
        log "$variant: cachefence logged warnings:"
        grep -E ' (WARN|ERROR) ' "$WORK/cachefence-$variant.log" | head -5 | sed 's/^/  /' >&2
    fi
    stop_proxy
    if [ -n "$problem" ]; then
        FAILED=1
        log "FAILED $variant: $problem"
    fi
}

IFS=, read -r -a VARIANT_LIST <<<"$VARIANTS"
for variant in "${VARIANT_LIST[@]}"; do
    case "$variant" in
        notify) run_variant notify "$SECONDS_RUN" "$CONFIG_NOTIFY" ;;
        poll) run_variant poll "$POLL_SECONDS" "$CONFIG_POLL" ;;
        *) die "unknown variant $variant (notify, poll)" ;;
    esac
done

# ------------------------------------------------------------------ report
declare -A VLABEL VSECS
VLABEL[notify]="notify"; VSECS[notify]=$SECONDS_RUN
VLABEL[poll]="poll only"; VSECS[poll]=$POLL_SECONDS
g() { printf '%s' "${RES["$1|$2"]:-n/a}"; }
echo
echo "change-log latency  ($(date -u '+%Y-%m-%d %H:%M:%SZ'), $(nproc) CPUs, redis on CPU $SERVER_CPU, cachefence+driver on CPU $CLIENT_CPU, nice $NICE, load before: $load1)"
echo "UPDATE of one row of $SCHEMA.items (autocommit, $CONNS connections, ${RATE}/s target, ids cycling over 1..$ROWS) -> DEL item:<id>;"
echo "latency = Redis 'del' keyspace event of item:<id> - COMMIT returned to the client; poll_interval $POLL_INTERVAL"
echo
header=$(printf '%-10s %5s %7s %7s %7s %9s %9s %9s %9s %8s' variant secs updates "rate/s" events "p50 ms" "p90 ms" "p99 ms" "max ms" missing)
echo "$header"
echo "${header//?/-}"
for variant in "${VARIANT_LIST[@]}"; do
    printf '%-10s %5s %7s %7s %7s %9s %9s %9s %9s %8s\n' "${VLABEL[$variant]}" "${VSECS[$variant]}" \
        "$(g "$variant" updates)" "$(g "$variant" rate)" "$(g "$variant" events)" \
        "$(g "$variant" lat_p50)" "$(g "$variant" lat_p90)" "$(g "$variant" lat_p99)" "$(g "$variant" lat_max)" \
        "$(g "$variant" missing)"
done
echo
for variant in "${VARIANT_LIST[@]}"; do
    echo "${VLABEL[$variant]}: min $(g "$variant" lat_min) ms, mean $(g "$variant" lat_mean) ms;" \
        "UPDATE round trip p50 $(g "$variant" rtt_p50) / p99 $(g "$variant" rtt_p99) / max $(g "$variant" rtt_max) ms;" \
        "failed $(g "$variant" failed), del before COMMIT returned $(g "$variant" negative), unexpected events $(g "$variant" unexpected_events)," \
        "ids skipped (still in flight) $(g "$variant" skipped_ids), slots dropped $(g "$variant" late_slots);" \
        "proxy: rows consumed $(g "$variant" changelog_rows_consumed), retries $(g "$variant" changelog_retries), warnings logged $(g "$variant" warnings);" \
        "outbox rows left $(g "$variant" outbox_left)"
done
echo "(rows consumed include the driver's warm-up update; 'slowest' updates are listed on stderr)"

MISSING_ALL=0
for variant in "${VARIANT_LIST[@]}"; do
    m=${RES["$variant|missing"]:-}
    if [ -z "$m" ] || [ "$m" != 0 ]; then MISSING_ALL=1; fi
done
echo
if [ "$FAILED" -ne 0 ]; then
    echo "some variants FAILED to run (see [changelog] messages on stderr); numbers above are incomplete"
    exit 1
fi
if [ "$MISSING_ALL" -ne 0 ]; then
    echo "check: missing invalidations: FAIL (every committed update must delete its key)"
    exit 1
fi
echo "check: missing invalidations: 0 in every variant (PASS)"
exit 0
