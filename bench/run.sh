#!/usr/bin/env bash
# cachefence benchmark: direct Redis vs twemproxy vs cachefence, in one run.
#
# Starts its own scratch redis-server (CPU 0), twemproxy and cachefence, once
# with one upstream connection per client (`cachefence`) and once with shared
# upstream connections (`shared`, --shared-connections) (CPU 1, same CPU as
# the redis-benchmark client), runs redis-benchmark in three layouts, repeats
# each measurement and reports medians, ratios to direct Redis in the same
# run, CPU per request of Redis and of the proxy, the targets, the proxies'
# RSS under load, and how many upstream connections the cachefence proxies
# open for 1000 idle + 50 busy clients.
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
TARGETS_LIST=${BENCH_TARGETS:-"redis twemproxy cachefence shared"}
SHARED_CONNECTIONS=${BENCH_SHARED_CONNECTIONS:-1}
WORKERS=1           # --workers of both cachefence targets
IDLE_CLIENTS=1000   # idle client connections of the connection-count part
RSS_LIMIT_KB=$((8 * 1024))

HOST=127.0.0.1
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

scale_n() { # integer n * SCALE, at least 1000
    awk -v n="$1" -v s="$SCALE" 'BEGIN { v = int(n * s); if (v < 1000) v = 1000; print v }'
}
[[ "$SHARED_CONNECTIONS" =~ ^[0-9]+$ ]] || die "BENCH_SHARED_CONNECTIONS must be a number, not '$SHARED_CONNECTIONS'"

# The connection-count part holds IDLE_CLIENTS sockets open in a helper and
# as many in the proxy (twice that for a proxy with one upstream connection
# per client), and Redis sizes its maxclients from this limit too.
NOFILE=$(ulimit -n)
if [ "$NOFILE" != unlimited ] && [ "$NOFILE" -lt 4096 ]; then
    ulimit -n 4096 || true
    NOFILE=$(ulimit -n)
    [ "$NOFILE" = unlimited ] || [ "$NOFILE" -ge 4096 ] ||
        log "WARNING: open files limit is $NOFILE (could not raise it to 4096); the $IDLE_CLIENTS idle connections may not fit"
fi

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
if [[ " $TARGETS_LIST " == *" cachefence "* ]] || [[ " $TARGETS_LIST " == *" shared "* ]]; then find_cachefence; fi

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
    log "starting cachefence on $HOST:${PORT[cachefence]} (CPU $CLIENT_CPU, --workers $WORKERS, --no-fences, --shared-connections 0)"
    taskset -c "$CLIENT_CPU" "$CACHEFENCE" --listen "$HOST:${PORT[cachefence]}" \
        --upstream "$HOST:$REDIS_PORT" --workers "$WORKERS" --log-level warn --no-fences --shared-connections 0 \
        >"$WORK/cachefence.log" 2>&1 &
    PID[cachefence]=$!
    PIDS+=("${PID[cachefence]}")
    wait_port "${PORT[cachefence]}" "${PID[cachefence]}" || { cat "$WORK/cachefence.log" >&2 || true; die "cachefence did not start"; }
fi

if [[ " $TARGETS_LIST " == *" shared "* ]]; then
    free_port; PORT[shared]=$FREE_PORT
    # The same proxy core, but every client's commands go out pipelined on
    # SHARED_CONNECTIONS upstream connections (issue "shared upstream connections").
    log "starting cachefence (shared) on $HOST:${PORT[shared]} (CPU $CLIENT_CPU, --workers $WORKERS, --no-fences, --shared-connections $SHARED_CONNECTIONS)"
    taskset -c "$CLIENT_CPU" "$CACHEFENCE" --listen "$HOST:${PORT[shared]}" \
        --upstream "$HOST:$REDIS_PORT" --workers "$WORKERS" --log-level warn --no-fences \
        --shared-connections "$SHARED_CONNECTIONS" \
        >"$WORK/shared.log" 2>&1 &
    PID[shared]=$!
    PIDS+=("${PID[shared]}")
    wait_port "${PORT[shared]}" "${PID[shared]}" || { cat "$WORK/shared.log" >&2 || true; die "cachefence (shared) did not start"; }
fi

read -r -a TARGETS <<<"$TARGETS_LIST"
for t in "${TARGETS[@]}"; do
    [ -n "${PORT[$t]:-}" ] || die "unknown target '$t' (known: redis twemproxy cachefence shared)"
    out=$(redis-cli -h "$HOST" -p "${PORT[$t]}" set bench:probe ok 2>&1) || true
    [ "$out" = OK ] || die "$t: SET probe failed: $out"
    out=$(redis-cli -h "$HOST" -p "${PORT[$t]}" get bench:probe 2>&1) || true
    [ "$out" = ok ] || die "$t: GET probe failed: $out"
done

have() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }
rss_kb() { # VmRSS of pid $1 in kB, 0 if gone
    local kb
    kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null) || true
    [[ "$kb" =~ ^[0-9]+$ ]] && echo "$kb" || echo 0
}
cpu_ticks() { # utime+stime of pid $1 (all its threads) in clock ticks, empty if gone
    local stat f
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo ""; return; }
    # Fields 14 and 15; the command name (field 2) may hold spaces, so count
    # from the ")" that closes it: field 3 is then f[0].
    read -r -a f <<<"${stat##*) }"
    if [[ "${f[11]:-}" =~ ^[0-9]+$ ]] && [[ "${f[12]:-}" =~ ^[0-9]+$ ]]; then
        echo $((f[11] + f[12]))
    else
        echo ""
    fi
}
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
[[ "$CLK_TCK" =~ ^[0-9]+$ ]] && [ "$CLK_TCK" -gt 0 ] || CLK_TCK=100
us_per_req() { # us_per_req TICKS REQUESTS: CPU microseconds per request
    awk -v d="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN { if (n > 0) printf "%.3f", d * 1e6 / hz / n }'
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
declare -A CPU_R CPU_F CPU_T  # key "layout|target" -> space separated CPU us/request per run
                              # of Redis, of the target process (front) and of both
FAILED=0

# run_one LAYOUT TARGET RUN: one redis-benchmark invocation (SET then GET)
run_one() {
    local layout=$1 target=$2 run=$3
    local out="$WORK/out.$layout.$target.$run" err="$WORK/err.$layout.$target.$run"
    local sample=0
    [ "$layout" = c50_P1 ] && sample=1
    # CPU of Redis and of the target process (none for direct Redis) over
    # the call; redis-benchmark runs SET then GET, L_N requests each.
    local r0 r1 f0="" f1=""
    r0=$(cpu_ticks "$REDIS_PID")
    [ "$target" = redis ] || f0=$(cpu_ticks "${PID[$target]}")
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
    r1=$(cpu_ticks "$REDIS_PID")
    [ "$target" = redis ] || f1=$(cpu_ticks "${PID[$target]}")
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
    local reqs=$((2 * ${L_N[$layout]})) cr cf="" ct
    if [ -z "$problem" ] && [ -n "$r0" ] && [ -n "$r1" ]; then
        cr=$(us_per_req $((r1 - r0)) "$reqs")
        if [ "$target" = redis ]; then
            ct=$cr
        elif [ -n "$f0" ] && [ -n "$f1" ]; then
            cf=$(us_per_req $((f1 - f0)) "$reqs")
            ct=$(us_per_req $((r1 - r0 + f1 - f0)) "$reqs")
        else
            ct=""
        fi
        CPU_R["$layout|$target"]+="$cr "
        [ -n "$cf" ] && CPU_F["$layout|$target"]+="$cf "
        [ -n "$ct" ] && CPU_T["$layout|$target"]+="$ct "
        line+=" cpu_us/req=$cr${cf:++$cf}"
    fi
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

# -------------------------------------------------------- connection count
# For each cachefence target: IDLE_CLIENTS idle client connections (each
# sends one PING and reads +PONG, then stays open) held by a Python helper,
# and meanwhile 50 busy clients (redis-benchmark -c 50 -P 1 -t get,set).
# During the busy run Redis' connected_clients is sampled every 0.2 s;
# upstream connections = max - 1 (the sampling redis-cli) - the connections
# that other processes (twemproxy, the other cachefence target) held to
# Redis just before the idle clients connected. The proxy's own sockets to
# Redis (ss -p) are shown beside it as a cross-check. The proxies run with
# the default max_clients (10000), so IDLE_CLIENTS + 50 fit.
cat >"$WORK/idle_clients.py" <<'EOF'
import socket, sys, time
host, port, n, hold, ready = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
deadline = time.monotonic() + 60  # to connect them all
socks, bad, first_bad = [], 0, ""
for i in range(n):
    if time.monotonic() > deadline:
        sys.exit(f"timed out after {i} connections")
    s = socket.create_connection((host, port), timeout=10)
    socks.append(s)
    s.sendall(b"PING\r\n")
    buf = b""
    while not buf.endswith(b"\r\n") and len(buf) < 512:
        chunk = s.recv(512)
        if not chunk:
            break
        buf += chunk
    if buf != b"+PONG\r\n":
        bad += 1
        first_bad = first_bad or repr(buf[:80])
with open(ready + ".tmp", "w") as f:
    f.write(f"{len(socks)} {bad} {first_bad}\n")
import os
os.rename(ready + ".tmp", ready)
end = time.monotonic() + hold  # then keep them open until killed (or hold runs out)
while time.monotonic() < end:
    time.sleep(0.5)
EOF
command -v python3 >/dev/null 2>&1 || die "python3 not found (needed for the connection count)"

redis_clients() { # Redis' connected_clients (this redis-cli included), empty on error
    local v
    v=$(redis-cli -h "$HOST" -p "$REDIS_PORT" INFO clients 2>/dev/null |
        awk -F: '/^connected_clients:/ { gsub(/\r/, "", $2); print $2 + 0 }') || true
    [[ "$v" =~ ^[0-9]+$ ]] && echo "$v" || echo ""
}
own_upstream() { # established TCP connections of pid $1 to Redis (ss -p), empty without ss
    command -v ss >/dev/null 2>&1 || { echo ""; return; }
    ss -Htnp state established "( dport = :$REDIS_PORT )" 2>/dev/null |
        awk -v p="pid=$1," 'index($0, p) { n++ } END { print n + 0 }'
}
declare -A CONN_UP CONN_CC CONN_OTHER CONN_OWN CONN_RSS CONN_SAMPLES CONN_IDLE_LEFT
N_CONN=$(scale_n "$N_P1")
for t in cachefence shared; do
    have "$t" || continue
    tpid=${PID[$t]}
    log "connection count $t: $IDLE_CLIENTS idle clients + redis-benchmark -c 50 -P 1 -n $N_CONN"
    # Baseline: the sampler itself and whatever else holds connections to Redis.
    base=$(redis_clients)
    own0=$(own_upstream "$tpid")
    other=""
    [ -n "$base" ] && other=$((base - 1 - ${own0:-0}))
    ready="$WORK/idle.$t.ready"
    taskset -c "$CLIENT_CPU" timeout $((TIMEOUT + 120)) python3 "$WORK/idle_clients.py" \
        "$HOST" "${PORT[$t]}" "$IDLE_CLIENTS" $((TIMEOUT + 90)) "$ready" 2>"$WORK/idle.$t.err" &
    hpid=$!
    PIDS+=("$hpid")
    for _ in $(seq 1 700); do  # up to 70 s (the helper gives up after 60)
        [ -e "$ready" ] && break
        kill -0 "$hpid" 2>/dev/null || break
        sleep 0.1
    done
    problem=""
    if [ ! -e "$ready" ]; then
        problem="the idle clients did not connect: $(tail -n 3 "$WORK/idle.$t.err" 2>/dev/null | tr '\n' ' ')"
    else
        read -r idle_n idle_bad idle_first <"$ready" || true
        [ "${idle_n:-0}" = "$IDLE_CLIENTS" ] && [ "${idle_bad:-1}" = 0 ] ||
            problem="idle clients: ${idle_n:-?} connected, ${idle_bad:-?} without +PONG (first: ${idle_first:-})"
    fi
    if [ -z "$problem" ]; then
        out="$WORK/out.conn.$t" err="$WORK/err.conn.$t"
        taskset -c "$CLIENT_CPU" timeout "$TIMEOUT" redis-benchmark -h "$HOST" -p "${PORT[$t]}" \
            -c 50 -P 1 -n "$N_CONN" -d "$VALUE_SIZE" -r "$KEYSPACE" -t get,set --csv >"$out" 2>"$err" &
        bpid=$!
        cc_max=0 own_max=0 rss_max=0 samples=0
        while :; do  # bounded by the benchmark's timeout
            cc=$(redis_clients); own=$(own_upstream "$tpid"); kb=$(rss_kb "$tpid")
            if [ -n "$cc" ]; then
                samples=$((samples + 1))
                [ "$cc" -gt "$cc_max" ] && cc_max=$cc
            fi
            [ -n "$own" ] && [ "$own" -gt "$own_max" ] && own_max=$own
            [ "$kb" -gt "$rss_max" ] && rss_max=$kb
            kill -0 "$bpid" 2>/dev/null || break
            sleep 0.2
        done
        rc=0
        wait "$bpid" || rc=$?
        [ "$rc" -eq 0 ] || problem="redis-benchmark exited with status $rc"
        if grep -qiE '^(error|.*error from server|.*server closed the connection)' "$out" "$err" 2>/dev/null; then
            problem="${problem:+$problem; }redis-benchmark reported errors"
        fi
        [ "$samples" -gt 0 ] && [ -n "$other" ] || problem="${problem:+$problem; }no connected_clients sample"
        kill -0 "$hpid" 2>/dev/null || problem="${problem:+$problem; }the idle clients' helper is gone"
        # The idle clients must still be connected after the busy run.
        if command -v ss >/dev/null 2>&1; then
            CONN_IDLE_LEFT[$t]=$(ss -Htn state established "( dport = :${PORT[$t]} )" 2>/dev/null | wc -l)
            [ "${CONN_IDLE_LEFT[$t]}" -ge "$IDLE_CLIENTS" ] ||
                problem="${problem:+$problem; }only ${CONN_IDLE_LEFT[$t]} idle clients still connected after the run"
        fi
        if [ -z "$problem" ]; then
            CONN_UP[$t]=$((cc_max - 1 - other))
            CONN_CC[$t]=$cc_max; CONN_OTHER[$t]=$other
            CONN_OWN[$t]=$own_max; CONN_RSS[$t]=$rss_max; CONN_SAMPLES[$t]=$samples
        fi
    fi
    kill -0 "$tpid" 2>/dev/null || problem="${problem:+$problem; }$t is no longer running"
    kill "$hpid" 2>/dev/null || true
    wait "$hpid" 2>/dev/null || true
    keep=()
    for pid in "${PIDS[@]}"; do [ "$pid" = "$hpid" ] || keep+=("$pid"); done
    PIDS=("${keep[@]}")
    if [ -n "$problem" ]; then
        FAILED=1
        log "FAILED connection count $t: $problem"
        sed 's/^/[bench]   | /' "$WORK/err.conn.$t" "$WORK/out.conn.$t" 2>/dev/null | grep -v 'WARNING: Could not fetch server CONFIG' | head -20 >&2 || true
    else
        log "$(printf 'connection count %-10s upstream=%s (connected_clients max %s, baseline %s) own sockets max %s  rss max %s kB  %s samples' \
            "$t" "${CONN_UP[$t]}" "$cc_max" "$base" "$own_max" "$rss_max" "$samples")"
    fi
    # Let the proxy close what the idle clients held before the next target's baseline.
    for _ in $(seq 1 50); do
        [ "$(own_upstream "$tpid")" = "${own0:-0}" ] && break
        sleep 0.1
    done
done

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
echo "cachefence here is the proxy core (--no-fences) with one upstream connection per client (--shared-connections 0); the fence layer is measured in the second part"
if have shared; then echo "shared = the same cachefence with --shared-connections $SHARED_CONNECTIONS (clients share pipelined upstream connections)"; fi
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

echo
echo "CPU per request: utime+stime from /proc/PID/stat (all threads) over each redis-benchmark call / (2 x n),"
echo "median over runs; tick = $((1000 / CLK_TCK)) ms; redis = the Redis server, front = the process in front of it"
header=$(printf '%-8s %-11s %12s %12s %12s' layout target "redis us/req" "front us/req" "total us/req")
header=${header//us\//µs/}
echo "$header"
echo "${header//?/-}"
fmt_us() { if [ -n "$1" ]; then printf '%.2f' "$1"; else printf 'n/a'; fi; }
declare -A CPU_MED_R CPU_MED_F CPU_MED_T
for layout in "${LAYOUTS[@]}"; do
    for t in "${TARGETS[@]}"; do
        # shellcheck disable=SC2086
        CPU_MED_R["$layout|$t"]=$(median ${CPU_R["$layout|$t"]:-})
        # shellcheck disable=SC2086
        CPU_MED_F["$layout|$t"]=$(median ${CPU_F["$layout|$t"]:-})
        # shellcheck disable=SC2086
        CPU_MED_T["$layout|$t"]=$(median ${CPU_T["$layout|$t"]:-})
        if [ "$t" = redis ]; then front="-"; else front=$(fmt_us "${CPU_MED_F["$layout|$t"]}"); fi
        printf '%-8s %-11s %12s %12s %12s\n' "${L_LABEL[$layout]}" "$t" \
            "$(fmt_us "${CPU_MED_R["$layout|$t"]}")" "$front" "$(fmt_us "${CPU_MED_T["$layout|$t"]}")"
    done
done

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

if have shared && have redis; then
    echo
    echo "targets (shared upstream connections, --shared-connections $SHARED_CONNECTIONS, --workers $WORKERS):"
    for cmd in GET SET; do
        if have twemproxy; then
            printf '  %-44s %10s  (twemproxy %s)\n' "$cmd c50 P1 ratio to direct Redis" \
                "${RATIO[c50_P1|$cmd|shared]:-n/a}" "${RATIO[c50_P1|$cmd|twemproxy]:-n/a}"
            check "$cmd c50 P1 shared ratio / twemproxy's" "$(run_ratio c50_P1 "$cmd" shared twemproxy)" ">=" 1.2
        else
            check "$cmd c50 P1 ratio (twemproxy not run)" "${RATIO[c50_P1|$cmd|shared]}" ">=" ""
        fi
    done
    check "Redis CPU us/request at c50 P1" "${CPU_MED_R[c50_P1|shared]}" "<=" 4
    check "GET c50 P16 ratio to direct Redis" "${RATIO[c50_P16|GET|shared]}" ">=" 0.75
    check "SET c50 P16 ratio to direct Redis" "${RATIO[c50_P16|SET|shared]}" ">=" 0.75
    check "GET c1 P1 ratio to direct Redis" "${RATIO[c1_P1|GET|shared]}" ">=" 0.65
    check "SET c1 P1 ratio to direct Redis" "${RATIO[c1_P1|SET|shared]}" ">=" 0.65
    check "upstream conns, $IDLE_CLIENTS idle + 50 busy clients" "${CONN_UP[shared]:-}" "<=" $((2 * WORKERS))
    rss_max_mb=$(awk -v k="${RSS_MAX[shared]}" 'BEGIN { if (k > 0) printf "%.1f", k / 1024 }')
    check "RSS MB, max during c50 P1 (50 busy clients)" "$rss_max_mb" "<=" "$((RSS_LIMIT_KB / 1024))"
fi

if have cachefence || have shared; then
    echo
    echo "upstream connections for $IDLE_CLIENTS idle + 50 busy clients (redis-benchmark -c 50 -P 1 -n $N_CONN -t get,set"
    echo "while $IDLE_CLIENTS clients that sent one PING stay connected; Redis connected_clients sampled every 0.2 s):"
    for t in cachefence shared; do
        have "$t" || continue
        if [ -z "${CONN_UP[$t]:-}" ]; then
            printf '  %-11s n/a (failed, see [bench] messages)\n' "$t"
            continue
        fi
        printf '  %-11s upstream %5s  (connected_clients max %s - 1 sampler - %s held by others; proxy'"'"'s own sockets max %s; %s samples)\n' \
            "$t" "${CONN_UP[$t]}" "${CONN_CC[$t]}" "${CONN_OTHER[$t]}" "${CONN_OWN[$t]:-n/a}" "${CONN_SAMPLES[$t]}"
        printf '  %-11s peak RSS %6.1f MB during that run\n' "" "$(awk -v k="${CONN_RSS[$t]}" 'BEGIN { print k / 1024 }')"
    done
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
