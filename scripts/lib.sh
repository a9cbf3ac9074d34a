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
    exec 3<>"/dev/tcp/127.0.0.1/$1" 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    read -r -t 1 reply <&3 || true
    exec 3<&- 3>&-
    case "$reply" in +PONG* | -NOAUTH*) return 0 ;; *) return 1 ;; esac
}
