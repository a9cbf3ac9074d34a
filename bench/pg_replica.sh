# A PostgreSQL primary and a streaming replica of the benchmark's own
# (sourced, not run; after lib.sh): start_pg_pair DIR DELAY initdb's a
# primary into DIR on a free loopback port, pg_basebackup's a replica that
# applies each change DELAY (e.g. 300ms) after its commit, and sets
# PG_PRIMARY_URL and PG_REPLICA_URL (database postgres); stop_pg_pair stops
# both. The server binaries: initdb's directory on PATH, else the newest
# /usr/lib/postgresql/*/bin. As root they run as the postgres user.

pg_bin_dir() {
    local initdb
    if initdb=$(command -v initdb 2>/dev/null); then
        initdb=$(readlink -f "$initdb")
        if [ -x "$(dirname "$initdb")/pg_basebackup" ]; then
            dirname "$initdb"
            return 0
        fi
    fi
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [ -n "$dir" ] && [ -x "$dir/initdb" ] || die "PostgreSQL's server binaries (initdb, pg_basebackup) not found"
    echo "$dir"
}

pg_as() { # run a server binary, as postgres when root
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_pg_pair() { # start_pg_pair DIR DELAY
    local dir=$1 delay=$2 bin
    bin=$(pg_bin_dir)
    PG_PAIR_BIN=$bin
    PG_PAIR_DIR=$dir
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
        chown postgres "$dir"
        chmod o+x "$(dirname "$dir")" # mktemp's 0700 would keep postgres out
    fi
    free_port; local primary=$FREE_PORT
    free_port; local replica=$FREE_PORT
    local opts="-k $dir -c listen_addresses=$HOST -c fsync=off -c full_page_writes=off"
    pg_as "$bin/initdb" -D "$dir/primary" -A trust -U postgres --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 ||
        die "initdb failed ($dir/initdb.log)"
    pg_as "$bin/pg_ctl" -D "$dir/primary" -o "-p $primary $opts" -l "$dir/primary.log" -w start >/dev/null ||
        die "the primary did not start ($dir/primary.log)"
    pg_as "$bin/pg_basebackup" -h "$HOST" -p "$primary" -U postgres -D "$dir/replica" -R -X stream -c fast \
        --no-sync || die "pg_basebackup failed"
    echo "recovery_min_apply_delay = '$delay'" | pg_as tee -a "$dir/replica/postgresql.auto.conf" >/dev/null
    pg_as "$bin/pg_ctl" -D "$dir/replica" -o "-p $replica $opts" -l "$dir/replica.log" -w start >/dev/null ||
        die "the replica did not start ($dir/replica.log)"
    PG_PRIMARY_URL=postgres://postgres@$HOST:$primary/postgres
    PG_REPLICA_URL=postgres://postgres@$HOST:$replica/postgres
}

stop_pg_pair() {
    [ -n "${PG_PAIR_DIR:-}" ] || return 0
    local name
    for name in replica primary; do
        pg_as "$PG_PAIR_BIN/pg_ctl" -D "$PG_PAIR_DIR/$name" -m immediate -w stop >/dev/null 2>&1 || true
    done
}
