#!/usr/bin/env bash
# cachefence soak: minutes of mixed cache-aside traffic through the release
# proxy, with the upstream Redis killed and restarted periodically.
#
# Starts its own scratch redis-server on a free loopback port and
# target/release/cachefence in front of it (built with cargo build --release
# unless --skip-build), then runs bench/soak.py for --minutes: worker
# threads doing GET / read-the-database-on-miss / SET EX (fill), and writers
# updating the database (a dict in the driver: the source of truth) then
# DEL-ing the key. Every --restart-every seconds Redis is killed (SIGKILL by
# default), kept down for --down seconds, and started again on the same
# port. Redis runs with appendonly yes / appendfsync always by default
# (--persistence none: no persistence, every restart empties the cache), so
# what Redis acknowledged survives the restart and a stale value found
# after one is a real consistency failure, not a Redis durability one.
#
# Every minute the driver prints throughput, p50/p99/max latency of one
# command through the proxy, errors, stale keys (see bench/soak.py for the
# exact definition: cached version != database version, the database row
# unchanged for more than 1 s before the check), Redis restarts and the
# proxy's RSS. Everything runs under `nice -n 10`, on 127.0.0.1 only, and
# everything started here is stopped on exit.
#
#   bash bench/soak.sh                                  # 10 minutes, restart every 2 min
#   bash bench/soak.sh --minutes 2 --restart-every 60
#
# Exit status: the driver's (0: no stale key or stale read, proxy alive),
# or nonzero when something failed to start.

set -euo pipefail

MINUTES=10
RESTART_EVERY=120
DOWN=1
SIGNAL=KILL
PERSISTENCE=always
WORKERS=8
RATE=4000
KEYS=2000
WRITE_RATIO=0.1
SKIP_BUILD=0
EXTRA=()

usage() {
    sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
    cat <<EOF
options:
  --minutes N          how long the traffic runs (default $MINUTES)
  --restart-every S    seconds between Redis restarts, 0 = never (default $RESTART_EVERY)
  --down S             seconds Redis stays down at each restart (default $DOWN)
  --signal KILL|TERM   how Redis is stopped (default $SIGNAL)
  --persistence always|everysec|none   Redis AOF fsync policy (default $PERSISTENCE)
  --workers N          worker threads / connections (default $WORKERS)
  --rate N             total operations per second, 0 = unlimited (default $RATE)
  --keys N             keys in the database (default $KEYS)
  --write-ratio F      share of operations that are writes (default $WRITE_RATIO)
  --skip-build         use the existing target/release/cachefence
  --                   what follows goes to bench/soak.py as is
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) MINUTES=$2; shift 2 ;;
        --restart-every) RESTART_EVERY=$2; shift 2 ;;
        --down) DOWN=$2; shift 2 ;;
        --signal) SIGNAL=$2; shift 2 ;;
        --persistence) PERSISTENCE=$2; shift 2 ;;
        --workers) WORKERS=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --keys) KEYS=$2; shift 2 ;;
        --write-ratio) WRITE_RATIO=$2; shift 2 ;;
        --skip-build) SKIP_BUILD=1; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

HOST=127.0.0.1
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
WORK_PREFIX=cachefence-soak

log() { printf '[soak %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '[soak] ERROR: %s\n' "$*" >&2; exit 1; }

case "$SIGNAL" in KILL | TERM) ;; *) die "--signal must be KILL or TERM" ;; esac
case "$PERSISTENCE" in
    always | everysec) PERSIST_ARGS=(--appendonly yes --appendfsync "$PERSISTENCE") ;;
    none) PERSIST_ARGS=(--appendonly no) ;;
    *) die "--persistence must be always, everysec or none" ;;
esac

# shellcheck source=../scripts/lib.sh
source "$REPO_ROOT/scripts/lib.sh"
ensure_installed redis-server redis-server redis-tools
command -v python3 >/dev/null 2>&1 || die "python3 not found (needed for bench/soak.py)"

CACHEFENCE=${CACHEFENCE_BIN:-$REPO_ROOT/target/release/cachefence}
if [ -z "${CACHEFENCE_BIN:-}" ] && [ "$SKIP_BUILD" != 1 ]; then
    log "cargo build --release (nice -n 10)"
    (cd "$REPO_ROOT" && nice -n 10 cargo build --release --quiet) >&2 || die "cargo build --release failed"
fi
[ -x "$CACHEFENCE" ] || die "$CACHEFENCE not found"

# shellcheck source=lib.sh
source "$SCRIPT_DIR/lib.sh"

free_port; REDIS_PORT=$FREE_PORT
free_port; PROXY_PORT=$FREE_PORT
mkdir -p "$WORK/redis"
REDIS_PID=""

start_redis() {
    nice -n 10 redis-server --bind "$HOST" --port "$REDIS_PORT" --save "" "${PERSIST_ARGS[@]}" \
        --dir "$WORK/redis" --logfile "$WORK/redis.log" --daemonize no &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    wait_port "$REDIS_PORT" "$REDIS_PID" || { tail -20 "$WORK/redis.log" >&2 || true; die "redis-server did not start"; }
}

stop_redis() {
    kill "-$SIGNAL" "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
    local kept=() pid
    for pid in "${PIDS[@]}"; do [ "$pid" = "$REDIS_PID" ] || kept+=("$pid"); done
    PIDS=("${kept[@]}")
}

log "starting redis-server on $HOST:$REDIS_PORT (persistence: $PERSISTENCE)"
start_redis

log "starting $CACHEFENCE on $HOST:$PROXY_PORT"
nice -n 10 "$CACHEFENCE" --listen "$HOST:$PROXY_PORT" --upstream "$HOST:$REDIS_PORT" \
    --cache '*' --log-level warn >"$WORK/cachefence.log" 2>&1 &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
wait_port "$PROXY_PORT" "$PROXY_PID" || { cat "$WORK/cachefence.log" >&2 || true; die "cachefence did not start"; }

log "traffic: $MINUTES min, $WORKERS workers, $RATE ops/s, $KEYS keys, write ratio $WRITE_RATIO; \
restart every ${RESTART_EVERY}s (SIG$SIGNAL, down ${DOWN}s)"
nice -n 10 python3 "$SCRIPT_DIR/soak.py" --port "$PROXY_PORT" --redis-port "$REDIS_PORT" \
    --proxy-pid "$PROXY_PID" --minutes "$MINUTES" --workers "$WORKERS" --rate "$RATE" \
    --keys "$KEYS" --write-ratio "$WRITE_RATIO" "${EXTRA[@]}" &
DRIVER_PID=$!
PIDS+=("$DRIVER_PID")

START=$SECONDS
RESTARTS=0
NEXT=$((START + RESTART_EVERY))
# No restart in the last 10 s: the final check should see Redis up.
LAST=$((START + $(awk -v m="$MINUTES" 'BEGIN { printf "%d", m * 60 }') - 10))
while kill -0 "$DRIVER_PID" 2>/dev/null; do
    if [ "$RESTART_EVERY" -gt 0 ] && [ "$SECONDS" -ge "$NEXT" ] && [ "$SECONDS" -lt "$LAST" ]; then
        RESTARTS=$((RESTARTS + 1))
        log "restart #$RESTARTS at +$((SECONDS - START))s: SIG$SIGNAL redis-server, down ${DOWN}s"
        stop_redis
        sleep "$DOWN"
        start_redis
        log "redis-server back (pid $REDIS_PID)"
        NEXT=$((NEXT + RESTART_EVERY))
    fi
    kill -0 "$PROXY_PID" 2>/dev/null || log "cachefence is no longer running!"
    sleep 1
done
RC=0
wait "$DRIVER_PID" || RC=$?
if ! kill -0 "$PROXY_PID" 2>/dev/null; then
    log "cachefence exited during the soak; its log:"
    tail -30 "$WORK/cachefence.log" >&2 || true
    RC=1
fi
# The proxy's warnings, ANSI colours and timestamps removed, numbers as N.
sed -E 's/\x1b\[[0-9;]*m//g' "$WORK/cachefence.log" | grep -E '^[^ ]+ +WARN ' \
    | sed -E 's/^[^ ]+ +WARN +//; s/[0-9]+(\.[0-9]+)*(:[0-9]+)?/N/g' >"$WORK/warnings" || true
log "done: $RESTARTS restarts; cachefence logged $(wc -l <"$WORK/warnings") warnings; driver exit status $RC"
sort "$WORK/warnings" | uniq -c | sort -rn | head -8 | sed 's/^/[soak]   /' >&2 || true
exit "$RC"
