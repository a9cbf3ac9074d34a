# Helpers shared by bench/run.sh, bench/fences.sh and bench/client_models.sh
# (sourced, not run): a scratch folder and the cleanup of every process
# started, loopback ports for the servers, and the cachefence binary.
# Expects HOST, REPO_ROOT, log() and die() to be defined, and WORK_PREFIX
# to name the scratch folder.

# ------------------------------------------------------- processes, cleanup
WORK=$(mktemp -d "${TMPDIR:-/tmp}/${WORK_PREFIX:-cachefence-bench}.XXXXXX")
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
    done
    if [ "${BENCH_KEEP_TMP:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

USED_PORTS=" "
# Ports are drawn below the kernel's ephemeral range (so that client sockets of
# other programs cannot hold them) and must have no socket at all on them.
EPHEMERAL_LOW=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
PORT_LOW=10000
PORT_HIGH=$((EPHEMERAL_LOW > PORT_LOW + 1000 ? EPHEMERAL_LOW - 1 : 32767))
port_in_use() {
    if command -v ss >/dev/null 2>&1; then
        [ -n "$(ss -Htan "( sport = :$1 )" 2>/dev/null)" ] && return 0
    fi
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}
free_port() { # sets FREE_PORT: a loopback port nothing uses, not handed out before
    local p i
    for i in $(seq 1 200); do
        p=$((PORT_LOW + (RANDOM * 32768 + RANDOM) % (PORT_HIGH - PORT_LOW + 1)))
        [[ "$USED_PORTS" == *" $p "* ]] && continue
        if ! port_in_use "$p"; then
            USED_PORTS+="$p "
            FREE_PORT=$p
            return 0
        fi
    done
    die "no free port found"
}

wait_port() { # wait until HOST:$1 accepts connections; $2 = pid that must stay alive
    local i
    for i in $(seq 1 100); do
        kill -0 "$2" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

# ------------------------------------------------------------ the binary
# Sets CACHEFENCE: $CACHEFENCE_BIN if given, else the release build (built
# first unless BENCH_SKIP_BUILD=1).
find_cachefence() {
    CACHEFENCE=${CACHEFENCE_BIN:-}
    if [ -z "$CACHEFENCE" ]; then
        if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
            log "cargo build --release"
            (cd "$REPO_ROOT" && cargo build --release --quiet) >&2 || die "cargo build --release failed"
        fi
        CACHEFENCE=$REPO_ROOT/target/release/cachefence
    fi
    [ -x "$CACHEFENCE" ] || die "$CACHEFENCE not found"
}
