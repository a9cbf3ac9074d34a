#!/usr/bin/env bash
# Proxy instructions per request, counted by callgrind: load-independent,
# so it can be compared across commits on a busy machine where timings
# cannot. Starts a scratch redis-server and one cachefence (--workers 1)
# under valgrind, runs one redis-benchmark workload through it, and prints
# the proxy's instructions per request and its top functions (inclusive).
#
#   bash bench/callgrind.sh                       # fenced SET, c50 P16
#   CG_TEST=set CG_PIPELINE=1 bash bench/callgrind.sh
#   CG_FENCES=0 bash bench/callgrind.sh           # the same with --no-fences
#
# Knobs: CG_TEST (redis-benchmark -t, default set), CG_CLIENTS (50),
# CG_PIPELINE (16), CG_REQUESTS (50000), CG_FENCES (1), CG_ON_WRITE (the
# fenced keys' on_write, default invalidate as in cachefence; bench/fences.sh
# measures write), CG_SHARED (1: the default shared connection; 0: one per
# client), CG_TOP (25 functions),
# CG_OUT (a path to keep the callgrind output at, for callgrind_annotate),
# CACHEFENCE_BIN (default target/release/cachefence, built if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

test_name=${CG_TEST:-set}
clients=${CG_CLIENTS:-50}
pipeline=${CG_PIPELINE:-16}
requests=${CG_REQUESTS:-50000}
fences=${CG_FENCES:-1}
on_write=${CG_ON_WRITE:-invalidate}
shared=${CG_SHARED:-1}
top=${CG_TOP:-25}
bin=${CACHEFENCE_BIN:-target/release/cachefence}

for tool in valgrind callgrind_annotate redis-server redis-benchmark redis-cli; do
    command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool is not on PATH" >&2; exit 1; }
done
[ -x "$bin" ] || cargo build --release --quiet

work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
redis_port=$(free_port)
proxy_port=$(free_port)
cleanup() {
    [ -n "${proxy_pid:-}" ] && kill "$proxy_pid" 2>/dev/null && wait "$proxy_pid" 2>/dev/null || true
    redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --logfile "$work/redis.log" --dir "$work"
for _ in $(seq 1 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

flags=(--listen "127.0.0.1:$proxy_port" --upstream "127.0.0.1:$redis_port" --workers 1
    --shared-connections "$shared" --log-level warn)
printf '[[cache]]\npattern = "*"\non_write = "%s"\n' "$on_write" >"$work/every-key.toml"
if [ "$fences" = 0 ]; then flags+=(--no-fences); else flags+=(--config "$work/every-key.toml"); fi
valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$bin" "${flags[@]}" \
    >"$work/proxy.log" 2>&1 &
proxy_pid=$!
for _ in $(seq 1 300); do redis-cli -p "$proxy_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

redis-benchmark -p "$proxy_port" -t "$test_name" -c "$clients" -P "$pipeline" -n "$requests" \
    -r 100000 -d 100 -q >"$work/bench.txt"
kill -INT "$proxy_pid"
wait "$proxy_pid" 2>/dev/null || true
proxy_pid=

[ -n "${CG_OUT:-}" ] && cp "$work/cg.out" "$CG_OUT"
# (awk reads to the end: an early exit would fail the pipeline under pipefail)
total=$(callgrind_annotate "$work/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done=1}')
echo "workload: $test_name c$clients P$pipeline, $requests requests, fences=$fences on_write=$on_write shared=$shared"
echo "proxy instructions: $total"
echo "per request: $((total / requests))"
echo
echo "top $top functions, inclusive (self: callgrind_annotate on CG_OUT):"
callgrind_annotate --inclusive=yes "$work/cg.out" 2>/dev/null |
    awk '/file:function/ {on=1; next} on && NF && shown < top {print; shown++}' top="$top"
