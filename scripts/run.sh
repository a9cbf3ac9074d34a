#!/usr/bin/env bash
# Runs cachefence on 127.0.0.1:6380 in front of the Redis on 127.0.0.1:6379.
# If no Redis answers there, starts a scratch redis-server (installing it if
# missing; it keeps nothing on disk). Extra arguments go to cachefence, e.g.
#   bash scripts/run.sh --log-level debug
#   bash scripts/run.sh --cache 'product:*' --cache 'page:*'   # your cache keys
# Without --cache or --config it fences the README's example keys, user:*.
# Then, in another terminal:  redis-cli -p 6380
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

UPSTREAM_PORT=${CACHEFENCE_UPSTREAM_PORT:-6379}
if ! redis_answers "$UPSTREAM_PORT"; then
    ensure_installed redis-server redis-server redis-tools
    echo "==> no Redis on 127.0.0.1:$UPSTREAM_PORT: starting a scratch redis-server" >&2
    redis-server --port "$UPSTREAM_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --daemonize yes --logfile /tmp/cachefence-scratch-redis.log
    for _ in $(seq 50); do redis_answers "$UPSTREAM_PORT" && break; sleep 0.1; done
    redis_answers "$UPSTREAM_PORT" || { echo "error: redis-server did not start" >&2; exit 1; }
fi
ensure_installed redis-cli redis-tools || true
cargo build --release --locked
# Which keys are a cache: the README's example keys unless told.
cache=(--cache 'user:*')
for arg in "$@"; do
    case "$arg" in --cache|--cache=*|--config|--config=*|-c|--no-fences) cache=() ;; esac
done
echo "==> cachefence on 127.0.0.1:6380 -> 127.0.0.1:$UPSTREAM_PORT   (try: redis-cli -p 6380 ping)" >&2
[ ${#cache[@]} -gt 0 ] && echo "==> fencing user:* (the README's example); --cache PATTERN says which keys are your cache" >&2
exec target/release/cachefence --listen 127.0.0.1:6380 --upstream "127.0.0.1:$UPSTREAM_PORT" "${cache[@]}" "$@"
