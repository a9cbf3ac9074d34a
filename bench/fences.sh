#!/usr/bin/env bash
# cachefence benchmark, fences section: what the consistency layer costs.
#
# Starts its own scratch redis-server (CPU 0) and two cachefence instances on
# it (CPU 1, with the client): one with fences on (every key fenced), one with
# --no-fences. In one run it measures
#   1. GET hits (preloaded keyspace, redis-benchmark -t get, c50 P16 and
#      c50 P1): fences on vs off vs direct Redis;
#   2. the cache-aside miss->fill loop (bench/missfill.py: GET k -> nil, then
#      SET k v EX 60 on the same connection, a fresh key every time): pairs/s
#      and Redis cost per pair (INFO commandstats and INFO cpu of the scratch
#      Redis, CONFIG RESETSTAT before each run), and Redis' bytes per pair;
#   3. writes: SET (redis-benchmark -t set, c50 P16, c50 P1, c1 P1) and DEL
#      of the keys that SET run just wrote (c50 P16): ops/s and Redis' CPU
#      per operation (INFO cpu, main thread) - through fences on every SET
#      is a fenced write and every DEL an invalidation: unpipelined, one
#      script call each; pipelined (P16), one MGET of the run's fences, and
#      plain commands where no fence exists (src/fence/probe.rs).
# Each measurement is repeated BENCH_RUNS times in a rotating order and the
# ratios are medians of per-run ratios, like bench/run.sh.
#
# Runs alone (bash bench/fences.sh) or at the end of bench/run.sh. Only
# loopback addresses are used. Everything started here is stopped on exit.
# Exit status: 0 when every measurement ran (even if a target is missed),
# nonzero when something failed to run. See bench/README.md.

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
FILL_SECONDS=${BENCH_FILL_SECONDS:-10}
FILL_CONNS=${BENCH_FILL_CONNS:-16}

HOST=127.0.0.1
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

log() { printf '[fences] %s\n' "$*" >&2; }
die() { printf '[fences] ERROR: %s\n' "$*" >&2; exit 1; }

scale_n() { # integer n * SCALE, at least 1000
    awk -v n="$1" -v s="$SCALE" 'BEGIN { v = int(n * s); if (v < 1000) v = 1000; print v }'
}

# ------------------------------------------------------------ dependencies
# shellcheck source=../scripts/lib.sh
source "$REPO_ROOT/scripts/lib.sh"

ensure_installed redis-server redis-server redis-tools
ensure_installed redis-cli redis-tools
ensure_installed redis-benchmark redis-tools
command -v python3 >/dev/null 2>&1 || die "python3 not found (needed for bench/missfill.py)"
command -v taskset >/dev/null 2>&1 || die "taskset (util-linux) not found"
CPUS=$(nproc)
if [ "$SERVER_CPU" -ge "$CPUS" ] || [ "$CLIENT_CPU" -ge "$CPUS" ]; then
    die "need CPUs $SERVER_CPU and $CLIENT_CPU but only $CPUS online (set BENCH_SERVER_CPU/BENCH_CLIENT_CPU)"
fi


WORK_PREFIX=cachefence-fences
# shellcheck source=lib.sh
source "$SCRIPT_DIR/lib.sh"
find_cachefence

# --------------------------------------------------------------- start up
declare -A PORT PID LABEL
# metrics and noexplain are "fences on" with one observability knob turned:
# the Prometheus endpoint on (latency timing), CACHE.EXPLAIN's history off.
TARGETS=(redis off on metrics noexplain)
LABEL[redis]="redis"; LABEL[off]="fences off"; LABEL[on]="fences on"
LABEL[metrics]="on+metrics"; LABEL[noexplain]="on-explain"

free_port; PORT[redis]=$FREE_PORT
log "starting redis-server on $HOST:${PORT[redis]} (CPU $SERVER_CPU)"
mkdir -p "$WORK/redis"
taskset -c "$SERVER_CPU" redis-server --bind "$HOST" --port "${PORT[redis]}" \
    --save "" --appendonly no --dir "$WORK/redis" --protected-mode yes \
    --logfile "$WORK/redis.log" --daemonize no &
PID[redis]=$!
PIDS+=("${PID[redis]}")
wait_port "${PORT[redis]}" "${PID[redis]}" || { cat "$WORK/redis.log" >&2 || true; die "redis-server did not start"; }
R() { redis-cli -h "$HOST" -p "${PORT[redis]}" "$@"; }
[ "$(R ping)" = PONG ] || die "redis-server does not answer PING"

# "Fences on": every key fenced, a SET that is not a fill stored
# (on_write = "write"), so that SETs measure the fenced write path.
printf '[[cache]]\npattern = "*"\non_write = "write"\n' >"$WORK/every-key.toml"
for t in on off metrics noexplain; do
    free_port; PORT[$t]=$FREE_PORT
    extra=(--config "$WORK/every-key.toml")
    case $t in
        off) extra=(--no-fences) ;;
        metrics) free_port; METRICS_PORT=$FREE_PORT; extra+=(--metrics-listen "$HOST:$METRICS_PORT") ;;
        noexplain) extra+=(--explain-keys 0) ;;
    esac
    log "starting cachefence (${LABEL[$t]}) on $HOST:${PORT[$t]} (CPU $CLIENT_CPU, --workers 1${extra[*]:+ ${extra[*]}})"
    taskset -c "$CLIENT_CPU" "$CACHEFENCE" --listen "$HOST:${PORT[$t]}" \
        --upstream "$HOST:${PORT[redis]}" --workers 1 --log-level warn "${extra[@]}" \
        >"$WORK/cachefence-$t.log" 2>&1 &
    PID[$t]=$!
    PIDS+=("${PID[$t]}")
    wait_port "${PORT[$t]}" "${PID[$t]}" || { cat "$WORK/cachefence-$t.log" >&2 || true; die "cachefence (${LABEL[$t]}) did not start"; }
done

for t in "${TARGETS[@]}"; do
    out=$(redis-cli -h "$HOST" -p "${PORT[$t]}" set bench:probe ok 2>&1) || true
    [ "$out" = OK ] || die "${LABEL[$t]}: SET probe failed: $out"
    out=$(redis-cli -h "$HOST" -p "${PORT[$t]}" get bench:probe 2>&1) || true
    [ "$out" = ok ] || die "${LABEL[$t]}: GET probe failed: $out"
done

FAILED=0
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
proc_ticks() { # user+system CPU of pid $1 so far, in clock ticks (0 if gone)
    awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0
}
cpu_us_per() { # cpu_us_per TICKS COUNT: CPU microseconds per unit
    awk -v t="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN { if (n > 0) printf "%.2f", t * 1000000 / hz / n }'
}
load1=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)
if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
    log "WARNING: load average is $load1 before starting; other work on this machine will make the numbers noisy"
fi
START=$SECONDS

# ------------------------------------------------- 1. GET hits, on vs off
# redis-benchmark -r N uses the keys key:000000000000 .. key:(N-1), 12 digits:
# preload every one of them so that every GET is a hit.
log "preloading $KEYSPACE keys (key:%012d, $VALUE_SIZE-byte values) into Redis"
R flushall >/dev/null
awk -v n="$KEYSPACE" -v d="$VALUE_SIZE" 'BEGIN {
    v = ""; for (j = 0; j < d; j++) v = v "x"
    for (i = 0; i < n; i++) {
        k = sprintf("key:%012d", i)
        printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", length(k), k, d, v
    }
}' | R --pipe >"$WORK/preload.out" 2>&1 || { cat "$WORK/preload.out" >&2; die "preload failed"; }
grep -q "errors: 0, replies: $KEYSPACE" "$WORK/preload.out" || { cat "$WORK/preload.out" >&2; die "preload failed"; }
[ "$(R dbsize)" -ge "$KEYSPACE" ] || die "preload: DBSIZE $(R dbsize) < $KEYSPACE"
R config resetstat >/dev/null

LAYOUTS=(c50_P16 c50_P1)
declare -A L_C L_P L_N L_LABEL
L_C[c50_P16]=50; L_P[c50_P16]=16; L_N[c50_P16]=$(scale_n "$N_P16"); L_LABEL[c50_P16]="c50 P16"
L_C[c50_P1]=50;  L_P[c50_P1]=1;   L_N[c50_P1]=$(scale_n "$N_P1");   L_LABEL[c50_P1]="c50 P1"
declare -A SAMPLES RPS PCPU  # PCPU: "layout|target|run" -> proxy CPU us per GET

run_get() { # run_get LAYOUT TARGET RUN
    local layout=$1 target=$2 run=$3
    local out="$WORK/get.$layout.$target.$run" err="$WORK/get.$layout.$target.$run.err"
    local rc=0 problem="" rps t0
    t0=$(proc_ticks "${PID[$target]}")
    taskset -c "$CLIENT_CPU" timeout "$TIMEOUT" redis-benchmark -h "$HOST" -p "${PORT[$target]}" \
        -c "${L_C[$layout]}" -P "${L_P[$layout]}" -n "${L_N[$layout]}" \
        -d "$VALUE_SIZE" -r "$KEYSPACE" -t get --csv >"$out" 2>"$err" || rc=$?
    [ "$rc" -eq 0 ] || problem="redis-benchmark exited with status $rc"
    if grep -qiE '^(error|.*error from server|.*server closed the connection)' "$out" "$err" 2>/dev/null; then
        problem="${problem:+$problem; }redis-benchmark reported errors"
    fi
    kill -0 "${PID[$target]}" 2>/dev/null || problem="${problem:+$problem; }${LABEL[$target]} is no longer running"
    rps=$(awk -F, '$1 == "\"GET\"" { gsub(/"/, "", $2); print $2; exit }' "$out")
    if [[ ! "$rps" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
        problem="${problem:+$problem; }no GET result"
    else
        SAMPLES["$layout|$target"]+="$rps "
        RPS["$layout|$target|$run"]=$rps
        [ "$target" = redis ] || PCPU["$layout|$target|$run"]=$(cpu_us_per "$(($(proc_ticks "${PID[$target]}") - t0))" "${L_N[$layout]}")
    fi
    if [ -n "$problem" ]; then
        FAILED=1
        log "FAILED GET ${L_LABEL[$layout]} ${LABEL[$target]} run $run: $problem"
        sed 's/^/[fences]   | /' "$err" "$out" | grep -v 'WARNING: Could not fetch server CONFIG' | head -20 >&2 || true
    else
        log "$(printf 'GET %-8s %-10s run %d: %s rps, proxy CPU %s us/GET' "${L_LABEL[$layout]}" "${LABEL[$target]}" "$run" "$rps" "${PCPU["$layout|$target|$run"]:--}")"
    fi
}

log "GET hits: runs=$RUNS  n: P16=${L_N[c50_P16]} P1=${L_N[c50_P1]}  -r $KEYSPACE"
for layout in "${LAYOUTS[@]}"; do
    for run in $(seq 1 "$RUNS"); do
        n=${#TARGETS[@]}
        for i in $(seq 0 $((n - 1))); do
            run_get "$layout" "${TARGETS[$(((i + run - 1) % n))]}" "$run"
        done
    done
done
# Every GET above must have been a hit, with no fence script run.
info_field() { # info_field SECTION FIELD: value of FIELD in INFO SECTION (0 if absent)
    R info "$1" | tr -d '\r' | awk -F: -v f="$2" '$1 == f { print $2; found = 1 } END { if (!found) print 0 }'
}
calls_of() { # calls of a commandstats entry (0 if absent)
    R info commandstats | tr -d '\r' | awk -F'[:=,]' -v c="cmdstat_$1" '$1 == c { print $3; found = 1 } END { if (!found) print 0 }'
}
GET_MISSES=$(info_field stats keyspace_misses)
GET_SCRIPTS=$(($(calls_of evalsha) + $(calls_of eval)))

# ---------------------------------------------- 2. cache-aside miss -> fill
declare -A MF  # "target|run|name" -> value printed by missfill.py
MF_NAMES=(pairs_per_s proxy_cpu_us_per_pair redis_cpu_us_per_pair cmd_us_per_pair scripts_per_pair bytes_per_pair
    get_per_pair get_upc set_per_pair set_upc evalsha_per_pair evalsha_upc eval_calls eval_upc)

run_fill() { # run_fill TARGET RUN
    local target=$1 run=$2
    local out="$WORK/fill.$target.$run" err="$WORK/fill.$target.$run.err"
    local rc=0 problem="" k v t0
    t0=$(proc_ticks "${PID[$target]}")
    taskset -c "$CLIENT_CPU" timeout "$((TIMEOUT + FILL_SECONDS))" python3 "$SCRIPT_DIR/missfill.py" \
        --host "$HOST" --port "${PORT[$target]}" --admin-port "${PORT[redis]}" \
        --conns "$FILL_CONNS" --seconds "$FILL_SECONDS" --value-size "$VALUE_SIZE" \
        --tag "$target$run" >"$out" 2>"$err" || rc=$?
    [ "$rc" -eq 0 ] || problem="missfill.py exited with status $rc"
    kill -0 "${PID[$target]}" 2>/dev/null || problem="${problem:+$problem; }${LABEL[$target]} is no longer running"
    while IFS='=' read -r k v; do
        [ -n "$k" ] && MF["$target|$run|$k"]=$v
    done <"$out"
    [ -n "${MF["$target|$run|pairs_per_s"]:-}" ] || problem="${problem:+$problem; }no result"
    if [ "$target" != redis ] && [ -n "${MF["$target|$run|pairs"]:-}" ]; then
        MF["$target|$run|proxy_cpu_us_per_pair"]=$(cpu_us_per "$(($(proc_ticks "${PID[$target]}") - t0))" "${MF["$target|$run|pairs"]}")
    fi
    if [ -n "$problem" ]; then
        FAILED=1
        log "FAILED miss->fill ${LABEL[$target]} run $run: $problem"
        sed 's/^/[fences]   | /' "$err" "$out" | head -20 >&2 || true
        # A failed run's numbers do not go into the medians.
        for k in "${MF_NAMES[@]}"; do unset "MF[$target|$run|$k]"; done
    else
        log "$(printf 'miss->fill %-10s run %d: %s pairs/s, proxy CPU %s us/pair, Redis CPU %s us/pair, cmd %s us/pair, scripts/pair %s, other: %s' \
            "${LABEL[$target]}" "$run" "${MF["$target|$run|pairs_per_s"]}" "${MF["$target|$run|proxy_cpu_us_per_pair"]:--}" "${MF["$target|$run|redis_cpu_us_per_pair"]}" \
            "${MF["$target|$run|cmd_us_per_pair"]}" "${MF["$target|$run|scripts_per_pair"]}" "${MF["$target|$run|other"]:-}")"
    fi
}

log "miss->fill: runs=$RUNS  $FILL_CONNS connections, ${FILL_SECONDS}s per run (FLUSHALL + CONFIG RESETSTAT before each)"
for run in $(seq 1 "$RUNS"); do
    n=${#TARGETS[@]}
    for i in $(seq 0 $((n - 1))); do
        run_fill "${TARGETS[$(((i + run - 1) % n))]}" "$run"
    done
done
# ------------------------------------------------- 3. writes: SET and DEL
W_LAYOUTS=(c50_P16 c50_P1 c1_P1)
L_C[c1_P1]=1; L_P[c1_P1]=1; L_N[c1_P1]=$(scale_n "$N_C1"); L_LABEL[c1_P1]="c1 P1"
WRITE_TARGETS=(redis off on)
declare -A WRPS WCPU  # "op|layout|target|run" -> ops/s, Redis CPU us per op
redis_cpu_s() { # Redis main-thread user+sys CPU seconds so far
    R info cpu | tr -d '\r' | awk -F: '$1 == "used_cpu_sys_main_thread" || $1 == "used_cpu_user_main_thread" { s += $2 } END { printf "%.6f", s }'
}
bench_write() { # bench_write OP LAYOUT TARGET RUN: one redis-benchmark run of SET or DEL
    local op=$1 layout=$2 target=$3 run=$4
    local out="$WORK/$op.$layout.$target.$run" err="$WORK/$op.$layout.$target.$run.err"
    local rc=0 problem="" rps c0 c1 what=(-t set)
    [ "$op" = del ] && what=(DEL "key:__rand_int__")
    c0=$(redis_cpu_s)
    taskset -c "$CLIENT_CPU" timeout "$TIMEOUT" redis-benchmark -h "$HOST" -p "${PORT[$target]}" \
        -c "${L_C[$layout]}" -P "${L_P[$layout]}" -n "${L_N[$layout]}" \
        -d "$VALUE_SIZE" -r "$KEYSPACE" --csv "${what[@]}" >"$out" 2>"$err" || rc=$?
    c1=$(redis_cpu_s)
    [ "$rc" -eq 0 ] || problem="redis-benchmark exited with status $rc"
    if grep -qiE '^(error|.*error from server|.*server closed the connection)' "$out" "$err" 2>/dev/null; then
        problem="${problem:+$problem; }redis-benchmark reported errors"
    fi
    kill -0 "${PID[$target]}" 2>/dev/null || problem="${problem:+$problem; }${LABEL[$target]} is no longer running"
    rps=$(awk -F, '$1 != "\"test\"" { gsub(/"/, "", $2); print $2; exit }' "$out")
    if [[ ! "$rps" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
        problem="${problem:+$problem; }no result"
    else
        WRPS["$op|$layout|$target|$run"]=$rps
        WCPU["$op|$layout|$target|$run"]=$(awk -v a="$c0" -v b="$c1" -v n="${L_N[$layout]}" 'BEGIN { printf "%.2f", (b - a) * 1000000 / n }')
    fi
    if [ -n "$problem" ]; then
        FAILED=1
        log "FAILED $op ${L_LABEL[$layout]} ${LABEL[$target]} run $run: $problem"
        sed 's/^/[fences]   | /' "$err" "$out" | grep -v 'WARNING: Could not fetch server CONFIG' | head -20 >&2 || true
    else
        log "$(printf '%-3s %-8s %-10s run %d: %s ops/s, Redis CPU %s us/op' "$op" "${L_LABEL[$layout]}" "${LABEL[$target]}" "$run" "$rps" "${WCPU["$op|$layout|$target|$run"]}")"
    fi
}
log "writes: runs=$RUNS  n: P16=${L_N[c50_P16]} P1=${L_N[c50_P1]} c1=${L_N[c1_P1]}  -r $KEYSPACE"
for layout in "${W_LAYOUTS[@]}"; do
    for run in $(seq 1 "$RUNS"); do
        n=${#WRITE_TARGETS[@]}
        for i in $(seq 0 $((n - 1))); do
            target=${WRITE_TARGETS[$(((i + run - 1) % n))]}
            bench_write set "$layout" "$target" "$run"
            # DEL right behind that target's own SET run: the same keys exist for each.
            [ "$layout" = c50_P16 ] && bench_write del "$layout" "$target" "$run"
        done
    done
done
log "fences measurements took $((SECONDS - START))s"
# The metrics instance did time its commands: its endpoint says so.
SCRAPED=$(python3 - "$HOST" "${METRICS_PORT}" <<'PY'
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
body = b""
while chunk := s.recv(65536):
    body += chunk
for line in body.decode().splitlines():
    if line.startswith('cachefence_command_duration_seconds_count{class="intercepted"}'):
        print(line.split()[-1])
PY
) || SCRAPED=""
[ -n "$SCRAPED" ] && [ "$SCRAPED" != 0 ] || { FAILED=1; log "FAILED: the metrics instance's /metrics shows no timed commands ('$SCRAPED')"; }

# ------------------------------------------------------------------ report
median() { # median of the numbers given as arguments (empty if none)
    [ $# -gt 0 ] || { echo ""; return; }
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { # ratio of $1 to $2, or empty
    [ -n "$1" ] && [ -n "$2" ] || { echo ""; return; }
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b }'
}
spread() { # (max - min) / median of the numbers given, as a percentage
    [ $# -gt 1 ] || { echo "-"; return; }
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; if (m > 0) printf "%.0f%%", 100 * (v[NR] - v[1]) / m; else print "-" }'
}
fmt() { # fmt FORMAT VALUE: printf, or n/a when empty
    if [ -n "$2" ]; then printf "$1" "$2"; else printf 'n/a'; fi
}
get_ratio() { # get_ratio LAYOUT A B: median over runs of rps(A)/rps(B) of the same run
    local vals=() run a b
    for run in $(seq 1 "$RUNS"); do
        a=${RPS["$1|$2|$run"]:-}; b=${RPS["$1|$3|$run"]:-}
        [ -n "$a" ] && [ -n "$b" ] && vals+=("$(ratio "$a" "$b")")
    done
    median "${vals[@]}"
}
mf_median() { # mf_median TARGET NAME: median over runs
    local vals=() run v
    for run in $(seq 1 "$RUNS"); do
        v=${MF["$1|$run|$2"]:-}
        [ -n "$v" ] && vals+=("$v")
    done
    median "${vals[@]}"
}
mf_ratio() { # mf_ratio A B NAME: median over runs of NAME(A)/NAME(B) of the same run
    local vals=() run a b
    for run in $(seq 1 "$RUNS"); do
        a=${MF["$1|$run|$3"]:-}; b=${MF["$2|$run|$3"]:-}
        [ -n "$a" ] && [ -n "$b" ] && vals+=("$(ratio "$a" "$b")")
    done
    median "${vals[@]}"
}

echo
echo "fences benchmark  ($(date -u '+%Y-%m-%d %H:%M:%SZ'), $(nproc) CPUs, redis on CPU $SERVER_CPU, client+cachefence on CPU $CLIENT_CPU, load before: $load1)"
echo "fences on = every key fenced ([[cache]] pattern = \"*\", on_write = \"write\"); fences off = --no-fences; on+metrics = on with"
echo "--metrics-listen; on-explain = on with --explain-keys 0; $RUNS runs, rotating order;"
echo "rps = median over runs; ratios = median over runs of per-run ratios"
echo
echo "1. GET hits: $KEYSPACE keys preloaded (-d $VALUE_SIZE), redis-benchmark -t get -r $KEYSPACE"
pcpu_median() { # pcpu_median LAYOUT TARGET: median proxy CPU us/GET over runs
    local vals=() run v
    for run in $(seq 1 "$RUNS"); do
        v=${PCPU["$1|$2|$run"]:-}
        [ -n "$v" ] && vals+=("$v")
    done
    median "${vals[@]}"
}
header=$(printf '%-8s %10s %6s | %10s %7s %7s | %10s %7s %7s | %7s %7s' layout "redis rps" spread \
    "fences off" "/redis" "cpu us" "fences on" "/redis" "cpu us" "on/off" "cpu")
echo "$header"
echo "${header//?/-}"
declare -A ONOFF
for layout in "${LAYOUTS[@]}"; do
    # shellcheck disable=SC2086
    ONOFF[$layout]=$(get_ratio "$layout" on off)
    CPU_OFF=$(pcpu_median "$layout" off); CPU_ON=$(pcpu_median "$layout" on)
    printf '%-8s %10s %6s | %10s %7s %7s | %10s %7s %7s | %7s %7s\n' "${L_LABEL[$layout]}" \
        "$(fmt '%.0f' "$(median ${SAMPLES["$layout|redis"]:-})")" "$(spread ${SAMPLES["$layout|redis"]:-})" \
        "$(fmt '%.0f' "$(median ${SAMPLES["$layout|off"]:-})")" "$(fmt '%s' "$(get_ratio "$layout" off redis)")" "$(fmt '%.2f' "$CPU_OFF")" \
        "$(fmt '%.0f' "$(median ${SAMPLES["$layout|on"]:-})")" "$(fmt '%s' "$(get_ratio "$layout" on redis)")" "$(fmt '%.2f' "$CPU_ON")" \
        "$(fmt '%s' "${ONOFF[$layout]}")" "$(fmt '%s' "$(ratio "$CPU_ON" "$CPU_OFF")")"
done
echo "cpu us = cachefence user+sys CPU per GET (/proc/PID/stat, median over runs); on/off cpu = ratio of those"
echo "check: keyspace misses during the GET runs: $GET_MISSES; EVALSHA+EVAL calls: $GET_SCRIPTS (both should be 0)"

echo
echo "2. cache-aside miss->fill: GET k (nil, fresh key) then SET k v EX 60 on the same connection;"
echo "   bench/missfill.py, $FILL_CONNS connections, ${FILL_SECONDS}s per run; Redis figures from the scratch Redis"
echo "   (CONFIG RESETSTAT before each run); medians over runs"
MAIN_TARGETS=(redis off on)
header=$(printf '%-40s %12s %12s %12s' "" redis "fences off" "fences on")
echo "$header"
echo "${header//?/-}"
mf_row() { # mf_row LABEL NAME FORMAT
    local row t
    row=$(printf '%-40s' "$1")
    for t in "${MAIN_TARGETS[@]}"; do row+=$(printf ' %12s' "$(fmt "$3" "$(mf_median "$t" "$2")")"); done
    echo "$row"
}
mf_row "miss+fill pairs/s" pairs_per_s '%.0f'
printf '%-40s %12s %12s %12s\n' "  ratio to direct Redis (per run)" "1" \
    "$(fmt '%s' "$(mf_ratio off redis pairs_per_s)")" "$(fmt '%s' "$(mf_ratio on redis pairs_per_s)")"
mf_row "cachefence CPU us/pair (/proc/PID/stat)" proxy_cpu_us_per_pair '%.2f'
mf_row "Redis CPU us/pair (INFO cpu, main thr.)" redis_cpu_us_per_pair '%.2f'
mf_row "Redis command us/pair (commandstats)" cmd_us_per_pair '%.2f'
mf_row "GET calls/pair" get_per_pair '%.2f'
mf_row "GET usec_per_call" get_upc '%.2f'
mf_row "SET calls/pair" set_per_pair '%.2f'
mf_row "SET usec_per_call" set_upc '%.2f'
mf_row "EVALSHA calls/pair" evalsha_per_pair '%.3f'
mf_row "EVALSHA usec_per_call" evalsha_upc '%.2f'
mf_row "EVAL calls (script loads, whole run)" eval_calls '%.0f'
mf_row "EVAL usec_per_call" eval_upc '%.2f'
mf_row "EVALSHA+EVAL calls/pair" scripts_per_pair '%.3f'
FILL_ONOFF=$(mf_ratio on off pairs_per_s)
CPU_ONOFF=$(mf_ratio on off redis_cpu_us_per_pair)
CMD_ONOFF=$(mf_ratio on off cmd_us_per_pair)
PCPU_ONOFF=$(mf_ratio on off proxy_cpu_us_per_pair)
mf_row "Redis bytes/pair (used_memory delta)" bytes_per_pair '%.1f'
FENCE_BYTES=$(awk -v on="$(mf_median on bytes_per_pair)" -v r="$(mf_median redis bytes_per_pair)" 'BEGIN { if (on != "" && r != "") printf "%.1f", on - r }')
echo "fences on / off: pairs/s $(fmt '%s' "$FILL_ONOFF"), cachefence CPU per pair $(fmt '%s' "$PCPU_ONOFF"), Redis CPU per pair $(fmt '%s' "$CPU_ONOFF"), Redis command time per pair $(fmt '%s' "$CMD_ONOFF")"
echo "Redis bytes a fence keeps per cached key after its fill (on - redis): $(fmt '%s' "$FENCE_BYTES")"
echo "(with fences on, GET/SET calls include the GETs and SETs the scripts run;"
echo " command us/pair counts top-level commands only, a script with everything it runs)"

echo
echo "3. writes: redis-benchmark -t set (-d $VALUE_SIZE -r $KEYSPACE), and DEL key:__rand_int__ right after each"
echo "   target's own c50 P16 SET run; Redis CPU per op = INFO cpu (main thread) delta / requests; medians"
w_median() { # w_median KIND OP LAYOUT TARGET: median over runs of WRPS or WCPU
    local vals=() run v
    for run in $(seq 1 "$RUNS"); do
        if [ "$1" = rps ]; then v=${WRPS["$2|$3|$4|$run"]:-}; else v=${WCPU["$2|$3|$4|$run"]:-}; fi
        [ -n "$v" ] && vals+=("$v")
    done
    median "${vals[@]}"
}
w_ratio() { # w_ratio OP LAYOUT A B: median over runs of rps(A)/rps(B) of the same run
    local vals=() run a b
    for run in $(seq 1 "$RUNS"); do
        a=${WRPS["$1|$2|$3|$run"]:-}; b=${WRPS["$1|$2|$4|$run"]:-}
        [ -n "$a" ] && [ -n "$b" ] && vals+=("$(ratio "$a" "$b")")
    done
    median "${vals[@]}"
}
header=$(printf '%-12s %10s | %10s %7s | %10s %7s %7s | %22s' op "redis rps" "fences off" "/redis" "fences on" "/redis" "on/off" "Redis CPU us/op r/off/on")
echo "$header"
echo "${header//?/-}"
for row in set:c50_P16 set:c50_P1 set:c1_P1 del:c50_P16; do
    op=${row%%:*}; layout=${row#*:}
    printf '%-12s %10s | %10s %7s | %10s %7s %7s | %22s\n' "${op^^} ${L_LABEL[$layout]}" \
        "$(fmt '%.0f' "$(w_median rps "$op" "$layout" redis)")" \
        "$(fmt '%.0f' "$(w_median rps "$op" "$layout" off)")" "$(fmt '%s' "$(w_ratio "$op" "$layout" off redis)")" \
        "$(fmt '%.0f' "$(w_median rps "$op" "$layout" on)")" "$(fmt '%s' "$(w_ratio "$op" "$layout" on redis)")" \
        "$(fmt '%s' "$(w_ratio "$op" "$layout" on off)")" \
        "$(w_median cpu "$op" "$layout" redis)/$(w_median cpu "$op" "$layout" off)/$(w_median cpu "$op" "$layout" on)"
done

echo
echo "4. observability: fences on with the Prometheus endpoint on (metrics: latency timed per batch)"
echo "   and with CACHE.EXPLAIN's history off (noexplain: explain_keys = 0); medians of per-run ratios"
header=$(printf '%-40s %12s %14s %14s' "" "on / redis" "on+metrics/on" "on-explain/on")
echo "$header"
echo "${header//?/-}"
for layout in "${LAYOUTS[@]}"; do
    printf '%-40s %12s %14s %14s\n' "GET hits ${L_LABEL[$layout]} rps" "$(fmt '%s' "$(get_ratio "$layout" on redis)")" \
        "$(fmt '%s' "$(get_ratio "$layout" metrics on)")" "$(fmt '%s' "$(get_ratio "$layout" noexplain on)")"
done
printf '%-40s %12s %14s %14s\n' "miss->fill pairs/s" "$(fmt '%s' "$(mf_ratio on redis pairs_per_s)")" \
    "$(fmt '%s' "$(mf_ratio metrics on pairs_per_s)")" "$(fmt '%s' "$(mf_ratio noexplain on pairs_per_s)")"
printf '%-40s %12s %14s %14s\n' "miss->fill cachefence CPU us/pair" "-" \
    "$(fmt '%s' "$(mf_ratio metrics on proxy_cpu_us_per_pair)")" "$(fmt '%s' "$(mf_ratio noexplain on proxy_cpu_us_per_pair)")"

check() { # name value op threshold
    local name=$1 value=$2 op=$3 thr=$4 verdict
    if [ -z "$value" ] || [ -z "$thr" ]; then
        verdict="n/a"
    elif awk -v v="$value" -v t="$thr" -v op="$op" 'BEGIN { exit !((op == ">=") ? (v >= t) : (op == "<=") ? (v <= t) : (v == t)) }'; then
        verdict=PASS
    else
        verdict=MISS
    fi
    printf '  %-44s %10s  target %s %-8s %s\n' "$name" "${value:-n/a}" "$op" "${thr:-n/a}" "$verdict"
}
echo
echo "targets (fences):"
check "GET-hit c50 P16 fences on / off" "${ONOFF[c50_P16]}" ">=" 0.95
check "GET-hit c50 P1 fences on / off" "${ONOFF[c50_P1]}" ">=" 0.95
check "GET-hit runs: misses + fence scripts" "$((GET_MISSES + GET_SCRIPTS))" "==" 0
SCRIPTS_ON=$(mf_median on scripts_per_pair)
SCRIPTS_ON_R=$(awk -v s="$SCRIPTS_ON" 'BEGIN { if (s != "") printf "%.2f", s }')
# Two fence operations per pair (the miss, the fill); on a shared upstream
# connection the calls of different clients next to each other run as one
# batch call, so there are at most two calls.
check "miss->fill fence script calls per pair (on)" "$SCRIPTS_ON_R" "<=" 2.00
printf '  %-44s %10s  (report only)\n' "miss->fill pairs/s fences on / off" "${FILL_ONOFF:-n/a}"
printf '  %-44s %10s  (report only)\n' "miss->fill cachefence CPU per pair on / off" "${PCPU_ONOFF:-n/a}"
printf '  %-44s %10s  (report only)\n' "miss->fill Redis CPU per pair on / off" "${CPU_ONOFF:-n/a}"
check "fenced SET c50 P16 / direct Redis" "$(w_ratio set c50_P16 on redis)" ">=" 0.50
check "fenced SET c50 P1 / fences off" "$(w_ratio set c50_P1 on off)" ">=" 0.95
W_CPU_RATIO=$(ratio "$(w_median cpu set c50_P16 on)" "$(w_median cpu set c50_P16 redis)")
check "Redis CPU per fenced SET / plain SET (P16)" "$W_CPU_RATIO" "<=" 2.00
check "fence bytes per cached key after its fill" "$FENCE_BYTES" "<=" 64

if [ "$FAILED" -ne 0 ]; then
    echo
    echo "some fences measurements FAILED (see [fences] messages on stderr); numbers above are incomplete"
    exit 1
fi
exit 0
