#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what a fresh machine lacks
# (redis-server, redis-tools, Node.js and ioredis; PostgreSQL, started if it
# is stopped, and its server binaries), then
# formatting, lints, the release build, and every test (unit, integration,
# proto-tests). The tests start their own redis-server processes on free
# loopback ports and use PostgreSQL schemas of their own.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_installed redis-server redis-server redis-tools
ensure_installed redis-cli redis-tools
ensure_installed redis-benchmark redis-tools
for component in rustfmt clippy; do
    cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$component"
done
ensure_installed node nodejs
ensure_installed npm npm
redis-server --version
ensure_postgres
# The server binaries (initdb, pg_ctl, pg_basebackup) for tests/replica_lag.rs,
# which starts a primary and a replica of its own.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    ensure_installed pg_ctlcluster postgresql
fi
# ioredis, for the client-model race tests (tests/node; the lock file pins it).
npm ci --prefix tests/node --no-audit --no-fund --loglevel=error

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "==> cargo build --release"
cargo build --locked --release
echo "==> cargo test"
cargo test --locked --all-targets
