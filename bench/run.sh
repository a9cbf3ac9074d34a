#!/usr/bin/env bash
# cachefence benchmark: direct Redis vs twemproxy vs cachefence, in one run.
#
# Starts its own scratch redis-server (CPU 0), twemproxy and cachefence
# (CPU 1, same CPU as the redis-benchmark client), runs redis-benchmark in
# three layouts, repeats each measurement and reports medians, ratios to
# direct Redis in the same run, the targets, and the proxies' RSS under load.
#
# Only loopback addresses are used. Everything started here is stopped on exit.
# Exit status: 0 when every measurement ran (even if a target is missed),
# nonzero when something failed to run.
#
# See bench/README.md for the knobs.

set -euo pipefail

# ---------------------------------------------------------------- settings
RUNS=${BENCH_RUNS:-3}
SCALE=${BENCH_N_SCALE:-1}
N_P16=${BENCH_N_P16:-200000}
N_P1=${BENCH_N_P1:-100000}
N_C1=${BENCH_N_C1:-20000}
VALUE_SIZE=${BENCH_VALUE_SIZE:-100}
KEYSPACE=${BENCH_KEYSPACE:-100000}
SERVER_CPU=${BENCH_SERVER_CPU:-0}
CLIENT_CPU=${BENCH_CLIENT_CPU:-1}
TIMEOUT=${BENCH_TIMEOUT:-300}
TARGETS_LIST=${BENCH_TARGETS:-"redis twemproxy cachefence"}
RSS_LIMIT_KB=$((8 * 1024))

HOST=127.0.0.1
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

scale_n() { # integer n * SCALE, at least 1000
    awk -v n="$1" -v s="$SCALE" 'BEGIN { v = int(n * s); if (v < 1000) v = 1000; print v }'
}

# ------------------------------------------------------------ dependencies
# shellcheck source=../scripts/lib.sh
source "$REPO_ROOT/scripts/lib.sh"

ensure_installed redis-server redis-server redis-tools
ensure_installed redis-cli redis-tools
ensure_installed redis-benchmark redis-tools

NUTCRACKER=${NUTCRACKER:-}
if [[ " $TARGETS_LIST " == *" twemproxy "* ]]; then
    if [ -z "$NUTCRACKER" ]; then
        NUTCRACKER=$(command -v nutcracker || true)
        [ -n "$NUTCRACKER" ] || [ ! -x /usr/sbin/nutcracker ] || NUTCRACKER=/usr/sbin/nutcracker
        if [ -z "$NUTCRACKER" ]; then
            ensure_installed nutcracker nutcracker || true
            NUTCRACKER=$(command -v nutcracker || echo /usr/sbin/nutcracker)
        fi
    fi
    [ -x "$NUTCRACKER" ] || die "nutcracker (twemproxy) not found"
fi
command -v taskset >/dev/null 2>&1 || die "taskset (util-linux) not found"
CPUS=$(nproc)
if [ "$SERVER_CPU" -ge "$CPUS" ] || [ "$CLIENT_CPU" -ge "$CPUS" ]; then
    die "need CPUs $SERVER_CPU and $CLIENT_CPU but only $CPUS online (set BENCH_SERVER_CPU/BENCH_CLIENT_CPU)"
fi

CACHEFENCE=${CACHEFENCE_BIN:-}

# shellcheck source=lib.sh
source "$SCRIPT_DIR/lib.sh"
if [[ " $TARGETS_LIST " == *" cachefence "* ]]; then find_cachefence; fi

# --------------------------------------------------------------- start up
free_port; REDIS_PORT=$FREE_PORT
log "starting redis-server on $HOST:$REDIS_PORT (CPU $SERVER_CPU)"
mkdir -p "$WORK/redis"
taskset -c "$SERVER_CPU" redis-server --bind "$HOST" --port "$REDIS_PORT" \
    --save "" --appendonly no --dir "$WORK/redis" --protected-mode yes \
    --logfile "$WORK/redis.log" --daemonize no &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_port "$REDIS_PORT" "$REDIS_PID" || { cat "$WORK/redis.log" >&2 || true; die "redis-server did not start"; }
redis-cli -h "$HOST" -p "$REDIS_PORT" ping >/dev/null || die "redis-server does not answer PING"

declare -A PORT PID
PORT[redis]=$REDIS_PORT
PID[redis]=$REDIS_PID

if [[ " $TARGETS_LIST " == *" twemproxy "* ]]; then
    free_port; PORT[twemproxy]=$FREE_PORT
    free_port; STATS_PORT=$FREE_PORT
    cat >"$WORK/nutcracker.yml" <<EOF
bench:
  listen: $HOST:${PORT[twemproxy]}
  hash: fnv1a_64
  distribution: ketama
  redis: true
  preconnect: true
  auto_eject_hosts: false
  servers:
   - $HOST:$REDIS_PORT:1
EOF
    "$NUTCRACKER" -t -c "$WORK/nutcracker.yml" >&2 || die "nutcracker rejected its configuration"
    log "starting twemproxy on $HOST:${PORT[twemproxy]} (CPU $CLIENT_CPU)"
    taskset -c "$CLIENT_CPU" "$NUTCRACKER" -c "$WORK/nutcracker.yml" -v 4 \
        -o "$WORK/nutcracker.log" -p "$WORK/nutcracker.pid" \
        -a "$HOST" -s "$STATS_PORT" &
    PID[twemproxy]=$!
    PIDS+=("${PID[twemproxy]}")
    wait_port "${PORT[twemproxy]}" "${PID[twemproxy]}" || { cat "$WORK/nutcracker.log" >&2 || true; die "twemproxy did not start"; }
fi

if [[ " $TARGETS_LIST " == *" cachefence "* ]]; then
    free_port; PORT[cachefence]=$FREE_PORT
    # This table measures the proxy core (issue #3's targets): fences off.
    # bench/fences.sh, run at the end, measures the fence layer on vs off.
    log "starting cachefence on $HOST:${PORT[cachefence]} (CPU $CLIENT_CPU, --workers 1, --no-fences)"
    taskset -c "$CLIENT_CPU" "$CACHEFENCE" --listen "$HOST:${PORT[cachefence]}" \
        --upstream "$HOST:$REDIS_PORT" --workers 1 --log-level warn --no-fences \
        >"$WORK/cachefence.log" 2>&1 &
    PID[cachefence]=$!
    PIDS+=("${PID[cachefence]}")
    wait_port "${PORT[cachefence]}" "${PID[cachefence]}" || { cat "$WORK/cachefence.log" >&2 || true; die "cachefence did not start"; }
fi

read -r -a TARGETS <<<"$TARGETS_LIST"
for t in "${TARGETS[@]}"; do
    [ -n "${PORT[$t]:-}" ] || die "unknown target '$t' (known: redis twemproxy cachefence)"
    out=$(redis-cli -h "$HOST" -p "${PORT[$t]}" set bench:probe ok 2>&1) || true
    [ "$out" = OK ] || die "$t: SET probe failed: $out"
    out=$(redis-cli -h "$HOST" -p "${PORT[$t]}" get bench:probe 2>&1) || true
    [ "$out" = ok ] || die "$t: GET probe failed: $out"
done

rss_kb() { # VmRSS of pid $1 in kB, 0 if gone
    local kb
    kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null) || true
    [[ "$kb" =~ ^[0-9]+$ ]] && echo "$kb" || echo 0
}
declare -A RSS_IDLE RSS_MAX
for t in "${TARGETS[@]}"; do RSS_IDLE[$t]=$(rss_kb "${PID[$t]}"); RSS_MAX[$t]=0; done

# ------------------------------------------------------------ measurements
LAYOUTS=("c50_P16" "c50_P1" "c1_P1")
declare -A L_C L_P L_N L_LABEL
L_C[c50_P16]=50; L_P[c50_P16]=16; L_N[c50_P16]=$(scale_n "$N_P16"); L_LABEL[c50_P16]="c50 P16"
L_C[c50_P1]=50;  L_P[c50_P1]=1;   L_N[c50_P1]=$(scale_n "$N_P1");   L_LABEL[c50_P1]="c50 P1"
L_C[c1_P1]=1;    L_P[c1_P1]=1;    L_N[c1_P1]=$(scale_n "$N_C1");    L_LABEL[c1_P1]="c1 P1"
CMDS=(GET SET)

declare -A SAMPLES  # key "layout|cmd|target" -> space separated rps values
declare -A RPS      # key "layout|cmd|target|run" -> rps of that run
FAILED=0

# run_one LAYOUT TARGET RUN: one redis-benchmark invocation (SET then GET)
run_one() {
    local layout=$1 target=$2 run=$3
    local out="$WORK/out.$layout.$target.$run" err="$WORK/err.$layout.$target.$run"
    local sample=0
    [ "$layout" = c50_P1 ] && sample=1
    taskset -c "$CLIENT_CPU" timeout "$TIMEOUT" redis-benchmark -h "$HOST" -p "${PORT[$target]}" \
        -c "${L_C[$layout]}" -P "${L_P[$layout]}" -n "${L_N[$layout]}" \
        -d "$VALUE_SIZE" -r "$KEYSPACE" -t set,get --csv >"$out" 2>"$err" &
    local bpid=$!
    if [ "$sample" = 1 ] && [ "$target" != redis ]; then
        local tpid=${PID[$target]} kb
        while kill -0 "$bpid" 2>/dev/null; do
            kb=$(rss_kb "$tpid")
            [ "$kb" -gt "${RSS_MAX[$target]}" ] && RSS_MAX[$target]=$kb
            sleep 0.2
        done
    fi
    local rc=0
    wait "$bpid" || rc=$?
    local problem=""
    [ "$rc" -eq 0 ] || problem="redis-benchmark exited with status $rc"
    if grep -qiE '^(error|.*error from server|.*server closed the connection)' "$out" "$err" 2>/dev/null; then
        problem="${problem:+$problem; }redis-benchmark reported errors"
    fi
    kill -0 "${PID[$target]}" 2>/dev/null || problem="${problem:+$problem; }$target is no longer running"
    local cmd rps line=""
    for cmd in "${CMDS[@]}"; do
        rps=$(awk -F, -v c="\"$cmd\"" '$1 == c { gsub(/"/, "", $2); print $2; exit }' "$out")
        if [[ ! "$rps" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
            problem="${problem:+$problem; }no $cmd result"
            continue
        fi
        SAMPLES["$layout|$cmd|$target"]+="$rps "
        RPS["$layout|$cmd|$target|$run"]=$rps
        line+=" $cmd=$rps"
    done
    if [ -n "$problem" ]; then
        FAILED=1
        log "FAILED ${L_LABEL[$layout]} $target run $run: $problem"
        sed 's/^/[bench]   | /' "$err" "$out" | grep -v 'WARNING: Could not fetch server CONFIG' | head -20 >&2 || true
    else
        log "$(printf '%-8s %-10s run %d:%s' "${L_LABEL[$layout]}" "$target" "$run" "$line")"
    fi
}

load1=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)
if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
    log "WARNING: load average is $load1 before starting; other work on this machine will make the numbers noisy"
fi
log "runs=$RUNS  n: P16=${L_N[c50_P16]} P1=${L_N[c50_P1]} c1=${L_N[c1_P1]}  -d $VALUE_SIZE -r $KEYSPACE"
START=$SECONDS
for layout in "${LAYOUTS[@]}"; do
    for run in $(seq 1 "$RUNS"); do
        # Rotate the target order between runs so that drift on a noisy
        # machine does not always favour the same target.
        n=${#TARGETS[@]}
        for i in $(seq 0 $((n - 1))); do
            run_one "$layout" "${TARGETS[$(((i + run - 1) % n))]}" "$run"
        done
    done
done
log "measurements took $((SECONDS - START))s"

# ------------------------------------------------------------------ report
median() { # median of the numbers given as arguments (empty if none)
    [ $# -gt 0 ] || { echo ""; return; }
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { # ratio of $1 to $2, or empty
    [ -n "$1" ] && [ -n "$2" ] || { echo ""; return; }
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b }'
}
# run_ratio LAYOUT CMD A B: median over runs of rps(A)/rps(B), both taken in
# the same round, so slow drift of the machine cancels out.
run_ratio() {
    local vals=() run a b
    for run in $(seq 1 "$RUNS"); do
        a=${RPS["$1|$2|$3|$run"]:-}; b=${RPS["$1|$2|$4|$run"]:-}
        [ -n "$a" ] && [ -n "$b" ] && vals+=("$(ratio "$a" "$b")")
    done
    median "${vals[@]}"
}
fmt_rps() { if [ -n "$1" ]; then printf '%.0f' "$1"; else printf 'n/a'; fi; }
spread() { # (max - min) / median of the numbers given, as a percentage
    [ $# -gt 1 ] || { echo "-"; return; }
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; if (m > 0) printf "%.0f%%", 100 * (v[NR] - v[1]) / m; else print "-" }'
}
declare -A MED RATIO
for layout in "${LAYOUTS[@]}"; do
    for cmd in "${CMDS[@]}"; do
        for t in "${TARGETS[@]}"; do
            # shellcheck disable=SC2086
            MED["$layout|$cmd|$t"]=$(median ${SAMPLES["$layout|$cmd|$t"]:-})
            RATIO["$layout|$cmd|$t"]=$(run_ratio "$layout" "$cmd" "$t" redis)
        done
    done
done

echo
echo "cachefence benchmark  ($(date -u '+%Y-%m-%d %H:%M:%SZ'), $(nproc) CPUs, redis on CPU $SERVER_CPU, client+proxies on CPU $CLIENT_CPU)"
echo "redis-benchmark -d $VALUE_SIZE -r $KEYSPACE -t get,set; $RUNS runs; rps = median over runs;"
echo "cachefence here is the proxy core (--no-fences); the fence layer is measured in the second part"
echo "ratio = median over runs of (target rps / direct Redis rps in the same run); spread = (max-min)/median of direct Redis rps"
echo
header=$(printf '%-8s %-4s' layout cmd)
for t in "${TARGETS[@]}"; do
    if [ "$t" = redis ]; then header+=$(printf ' %12s %6s' "redis rps" spread); else header+=$(printf ' %12s %6s' "$t" ratio); fi
done
echo "$header"
echo "${header//?/-}"
for layout in "${LAYOUTS[@]}"; do
    for cmd in "${CMDS[@]}"; do
        row=$(printf '%-8s %-4s' "${L_LABEL[$layout]}" "$cmd")
        for t in "${TARGETS[@]}"; do
            m=${MED["$layout|$cmd|$t"]:-}
            if [ "$t" = redis ]; then
                # shellcheck disable=SC2086
                row+=$(printf ' %12s %6s' "$(fmt_rps "$m")" "$(spread ${SAMPLES["$layout|$cmd|$t"]:-})")
            else
                r=${RATIO["$layout|$cmd|$t"]:-}
                row+=$(printf ' %12s %6s' "$(fmt_rps "$m")" "${r:-n/a}")
            fi
        done
        echo "$row"
    done
done

have() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }
check() { # name value op threshold
    local name=$1 value=$2 op=$3 thr=$4 verdict
    if [ -z "$value" ] || [ -z "$thr" ]; then
        verdict="n/a"
    elif awk -v v="$value" -v t="$thr" -v op="$op" 'BEGIN { exit !((op == ">=") ? (v >= t) : (v <= t)) }'; then
        verdict=PASS
    else
        verdict=MISS
    fi
    printf '  %-44s %10s  target %s %-8s %s\n' "$name" "${value:-n/a}" "$op" "${thr:-n/a}" "$verdict"
}

if have cachefence && have redis; then
    echo
    echo "targets (cachefence):"
    check "GET c50 P16 ratio to direct Redis" "${RATIO[c50_P16|GET|cachefence]}" ">=" 0.70
    check "SET c50 P16 ratio to direct Redis" "${RATIO[c50_P16|SET|cachefence]}" ">=" 0.70
    if have twemproxy; then
        printf '  %-44s %10s  (twemproxy %s)\n' "GET c50 P1 ratio to direct Redis" \
            "${RATIO[c50_P1|GET|cachefence]:-n/a}" "${RATIO[c50_P1|GET|twemproxy]:-n/a}"
        check "GET c50 P1 cachefence ratio / twemproxy's" "$(run_ratio c50_P1 GET cachefence twemproxy)" ">=" 0.95
    else
        check "GET c50 P1 ratio (twemproxy not run)" "${RATIO[c50_P1|GET|cachefence]}" ">=" ""
    fi
    check "GET c1 P1 ratio to direct Redis" "${RATIO[c1_P1|GET|cachefence]}" ">=" 0.55
    rss_max_mb=$(awk -v k="${RSS_MAX[cachefence]}" 'BEGIN { if (k > 0) printf "%.1f", k / 1024 }')
    check "RSS MB, max during c50 P1 (50 busy clients)" "$rss_max_mb" "<=" 8
fi

echo
echo "resident memory (VmRSS from /proc/PID/status):"
for t in "${TARGETS[@]}"; do
    [ "$t" = redis ] && continue
    printf '  %-11s idle %6.1f MB   max during c50 P1 %6.1f MB\n' "$t" \
        "$(awk -v k="${RSS_IDLE[$t]}" 'BEGIN { print k / 1024 }')" \
        "$(awk -v k="${RSS_MAX[$t]}" 'BEGIN { print k / 1024 }')"
done

if [ "$FAILED" -ne 0 ]; then
    echo
    echo "some measurements FAILED (see [bench] messages on stderr); numbers above are incomplete"
fi

# ------------------------------------------------------ fences section
# bench/fences.sh: GET hits and the miss->fill loop with fences on vs off,
# with its own scratch Redis and cachefence instances (same pinning).
# BENCH_FENCES=0 skips it.
FENCES_RC=0
if [ "${BENCH_FENCES:-1}" != 0 ] && have cachefence; then
    # Stop this part's processes first; the fences part starts its own.
    for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && wait "$pid" 2>/dev/null || true; done
    PIDS=()
    CACHEFENCE_BIN=$CACHEFENCE bash "$SCRIPT_DIR/fences.sh" || FENCES_RC=$?
fi

[ "$FAILED" -eq 0 ] && [ "$FENCES_RC" -eq 0 ] || exit 1
exit 0
