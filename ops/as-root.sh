# Sourced by ops/install-deps.sh and ops/check-alerts.sh: `as_root CMD...` runs CMD as root,
# directly when this is root, else through sudo (which asks for a password only on a terminal).
as_root() {
    if [[ $(id -u) == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "$(basename "$0"): need root or sudo to run: $*" >&2
        return 1
    fi
}
