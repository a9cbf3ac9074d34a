#!/usr/bin/env bash
# cachefence benchmark, Redis Cluster section (#19): a plain redis-benchmark
# through cachefence in front of a 3-master Redis Cluster, against
# `redis-benchmark --cluster` straight to the cluster, in the same run.
#
# Starts its own cluster (3 masters, no replicas, all on CPU 0) and two
# cachefence instances on it (CPU 1, with the client): --no-fences, and
# fences on every key (the defaults otherwise). Measures, each BENCH_RUNS
# times in a rotating order (ratios are medians of per-run ratios):
#   GET and SET, c50 P16 and c50 P1: direct (--cluster), fences off, on;
#   MGET of 10 keys in 10 slots (c50 P1): through the proxies, split into 10
#   commands; direct, 10 keys of one slot (`{tag}`), the most a cluster
#   client can send as one command.
# Every key is preloaded before each run's reads (GETs are hits).
# Exit status: 0 when every measurement ran, nonzero when something failed
# to run. Only loopback addresses; everything started is stopped on exit.

set -euo pipefail

RUNS=${BENCH_RUNS:-3}
N_P16=${BENCH_N_P16:-200000}
N_P1=${BENCH_N_P1:-100000}
KEYSPACE=${BENCH_KEYSPACE:-100000}
SERVER_CPU=${BENCH_SERVER_CPU:-0}
CLIENT_CPU=${BENCH_CLIENT_CPU:-1}
TIMEOUT=${BENCH_TIMEOUT:-300}

HOST=127.0.0.1
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] ERROR: %s\n' "$*" >&2; exit 1; }

# shellcheck source=../scripts/lib.sh
source "$REPO_ROOT/scripts/lib.sh"
ensure_installed redis-server redis-server redis-tools
ensure_installed redis-cli redis-tools
ensure_installed redis-benchmark redis-tools
command -v taskset >/dev/null 2>&1 || die "taskset (util-linux) not found"
CPUS=$(nproc)
if [ "$SERVER_CPU" -ge "$CPUS" ] || [ "$CLIENT_CPU" -ge "$CPUS" ]; then
    die "need CPUs $SERVER_CPU and $CLIENT_CPU but only $CPUS online (set BENCH_SERVER_CPU/BENCH_CLIENT_CPU)"
fi

WORK_PREFIX=cachefence-cluster
# shellcheck source=lib.sh
source "$SCRIPT_DIR/lib.sh"
find_cachefence

# --------------------------------------------------------------- the cluster
NODES=()
for i in 1 2 3; do
    free_port
    port=$FREE_PORT
    mkdir -p "$WORK/node$port"
    taskset -c "$SERVER_CPU" redis-server --port "$port" --bind "$HOST" --save '' --appendonly no \
        --cluster-enabled yes --cluster-config-file "$WORK/node$port/nodes.conf" --dir "$WORK/node$port" \
        --logfile "$WORK/node$port/redis.log" &
    PIDS+=($!)
    wait_port "$port" $! || die "cluster node on $port did not start"
    NODES+=("$HOST:$port")
done
redis-cli --cluster create "${NODES[@]}" --cluster-yes >"$WORK/create.log" 2>&1 ||
    die "redis-cli --cluster create failed: $(tail -3 "$WORK/create.log")"
for node in "${NODES[@]}"; do
    for _ in $(seq 1 100); do
        redis-cli -h "$HOST" -p "${node##*:}" cluster info | grep -q cluster_state:ok && break
        sleep 0.1
    done
done
SEED=${NODES[0]}
SEED_PORT=${SEED##*:}
log "cluster: ${NODES[*]}"

declare -A PORT
start_proxy() { # start_proxy NAME ARGS...
    local name=$1
    shift
    free_port
    PORT[$name]=$FREE_PORT
    taskset -c "$CLIENT_CPU" "$CACHEFENCE" --listen "$HOST:${PORT[$name]}" \
        --upstream "redis-cluster://$SEED" --log-level warn "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    wait_port "${PORT[$name]}" $! || die "cachefence ($name) did not start: $(tail -3 "$WORK/$name.log")"
}
start_proxy off --no-fences
start_proxy on --cache '*'

# ---------------------------------------------------------- measurements
rps() { # rps TARGET TEST CLIENTS PIPELINE N [COMMAND...]: requests per second
    local target=$1 test=$2 clients=$3 pipeline=$4 n=$5
    shift 5
    local args=(-h "$HOST" -c "$clients" -P "$pipeline" -n "$n" -r "$KEYSPACE" -q --csv)
    case $target in
        direct) args+=(-p "$SEED_PORT" --cluster) ;;
        *) args+=(-p "${PORT[$target]}") ;;
    esac
    case $test in
        get | set) args+=(-t "$test") ;;
        mget) args+=("$@") ;;
    esac
    local out
    out=$(taskset -c "$CLIENT_CPU" timeout "$TIMEOUT" redis-benchmark "${args[@]}" 2>&1) ||
        die "redis-benchmark $target $test failed: $out"
    printf '%s\n' "$out" | tail -1 | awk -F'"' '{ print $4 }'
}

# redis-benchmark -r N uses the keys key:000000000000 .. key:(N-1), 12
# digits (each __rand_int__ of a command drawn anew): preload all of them,
# and their {tag} twins for the direct MGET, through the fences-off proxy,
# so that every GET is a hit (a fenced miss that is never filled holds the
# next misses of its key for `hold`: not what this measures).
preload() {
    awk -v n="$KEYSPACE" 'BEGIN {
        for (i = 0; i < n; i++) {
            k = sprintf("key:%012d", i)
            printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$3\r\nxxx\r\n", length(k), k
            k = sprintf("{tag}key:%012d", i)
            printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$3\r\nxxx\r\n", length(k), k
        }
    }' | redis-cli -h "$HOST" -p "${PORT[off]}" --pipe >"$WORK/preload.out" 2>&1 ||
        die "preload failed: $(tail -3 "$WORK/preload.out")"
    grep -q "errors: 0, replies: $((2 * KEYSPACE))" "$WORK/preload.out" ||
        die "preload failed: $(tail -3 "$WORK/preload.out")"
}

MGET_SPLIT=(MGET)
MGET_SLOT=(MGET)
for i in $(seq 0 9); do
    MGET_SPLIT+=("key:__rand_int__")
    MGET_SLOT+=("{tag}key:__rand_int__")
done

declare -A R
# Reads first, on a full keyspace; then writes (through fences on a SET is
# a DEL, the default on_write = "invalidate").
CASES=("get 16 $N_P16" "get 1 $N_P1" "mget 1 $N_P1" "set 16 $N_P16" "set 1 $N_P1")
TARGETS=(direct off on)
for run in $(seq 1 "$RUNS"); do
    preload
    for c in "${CASES[@]}"; do
        read -r test pipeline n <<<"$c"
        for k in $(seq 0 2); do
            target=${TARGETS[$(((k + run) % 3))]}
            case "$test|$target" in
                mget\|direct) R["$target|$test|$pipeline|$run"]=$(rps "$target" mget 50 1 "$n" "${MGET_SLOT[@]}") ;;
                mget\|*) R["$target|$test|$pipeline|$run"]=$(rps "$target" mget 50 1 "$n" "${MGET_SPLIT[@]}") ;;
                *) R["$target|$test|$pipeline|$run"]=$(rps "$target" "$test" 50 "$pipeline" "$n") ;;
            esac
        done
    done
    log "run $run of $RUNS done"
done

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio_median() { # ratio_median A B TEST PIPELINE: median over runs of A/B
    local run
    for run in $(seq 1 "$RUNS"); do
        awk -v a="${R["$1|$3|$4|$run"]}" -v b="${R["$2|$3|$4|$run"]}" 'BEGIN { printf "%.3f\n", a / b }'
    done | median
}
rps_median() {
    local run
    for run in $(seq 1 "$RUNS"); do echo "${R["$1|$2|$3|$run"]}"; done | median
}

echo
echo "== cachefence in front of a 3-master Redis Cluster (${RUNS} runs, medians; Redis on CPU $SERVER_CPU, client and proxy on CPU $CLIENT_CPU)"
printf '%-22s %12s %12s %12s %10s %10s\n' workload direct fences-off fences-on off/direct on/direct
for c in "get 16" "set 16" "get 1" "set 1"; do
    read -r test pipeline <<<"$c"
    printf '%-22s %12.0f %12.0f %12.0f %10s %10s\n' "${test^^} c50 P$pipeline" \
        "$(rps_median direct "$test" "$pipeline")" "$(rps_median off "$test" "$pipeline")" \
        "$(rps_median on "$test" "$pipeline")" "$(ratio_median off direct "$test" "$pipeline")" \
        "$(ratio_median on direct "$test" "$pipeline")"
done
printf '%-22s %12.0f %12.0f %12.0f %10s %10s\n' "MGET 10 keys c50 P1" \
    "$(rps_median direct mget 1)" "$(rps_median off mget 1)" "$(rps_median on mget 1)" \
    "$(ratio_median off direct mget 1)" "$(ratio_median on direct mget 1)"
echo "   MGET: direct = 10 keys of one slot ({tag}, what a cluster client can send as one command);"
echo "   through cachefence = 10 keys of 10 slots, split into one MGET per slot and merged."
for target in off on; do
    for run in $(seq 1 "$RUNS"); do
        awk -v a="${R["$target|mget|1|$run"]}" -v b="${R["$target|get|1|$run"]}" 'BEGIN { printf "%.3f\n", a / b }'
    done | median | xargs printf '   split MGET of 10 / GET, c50 P1, fences %s: %s\n' "$target"
done
