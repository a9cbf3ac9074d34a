# Helpers shared by the scripts in this folder (sourced, not run).

# Installs Debian packages when a command is missing (needs root or sudo).
ensure_installed() { # ensure_installed COMMAND PACKAGE...
    command -v "$1" >/dev/null 2>&1 && return 0
    local command=$1
    shift
    echo "==> $command not found: installing $* (apt-get)" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
    command -v "$command" >/dev/null 2>&1 || { echo "error: could not install $*" >&2; return 1; }
}

# True when a Redis answers PING on 127.0.0.1:$1 (pure bash, no redis-cli needed).
redis_answers() { # redis_answers PORT
    local reply=""
    # The braces keep 2>/dev/null to the connect: on a bare `exec` it would
    # silence stderr for the rest of the script.
    { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    read -r -t 1 reply <&3 || true
    exec 3<&- 3>&-
    case "$reply" in +PONG* | -NOAUTH*) return 0 ;; *) return 1 ;; esac
}

# Makes sure the PostgreSQL the change-log tests use answers (default
# postgres://postgres@127.0.0.1:5432/test, or $CACHEFENCE_TEST_PG_URL): starts
# the local cluster when it is installed but stopped; on a machine without
# PostgreSQL, installs it and lets local loopback connections in (trust) and
# creates the database `test`. The tests create and drop their own schemas.
ensure_postgres() {
    export CACHEFENCE_TEST_PG_URL=${CACHEFENCE_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
    ensure_installed pg_isready postgresql-client
    pg_isready -q -h 127.0.0.1 -p 5432 && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    local fresh=false
    if ! ls -d /etc/postgresql/*/main >/dev/null 2>&1; then
        ensure_installed pg_ctlcluster postgresql
        fresh=true
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    if $fresh; then
        local hba="/etc/postgresql/$version/main/pg_hba.conf"
        $sudo sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    fi
    echo "==> starting PostgreSQL $version" >&2
    $sudo pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 60); do
        pg_isready -q -h 127.0.0.1 -p 5432 && break
        sleep 0.5
    done
    pg_isready -h 127.0.0.1 -p 5432 || { echo "error: PostgreSQL did not start" >&2; return 1; }
    if $fresh; then
        psql -h 127.0.0.1 -U postgres -d postgres -qc 'CREATE DATABASE test' || true
    fi
}
