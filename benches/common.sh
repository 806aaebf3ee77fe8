# Shared by the benchmark scripts (sourced, not run): logging, installing missing tools, and
# the pmesh-dev binary to measure. Expects REPO to be set.

log() { printf '%s\n' "$*" >&2; }

# install_missing PACKAGE...: installs Debian packages (the caller lists only missing ones).
install_missing() {
    [ $# -gt 0 ] || return 0
    log "installing $*"
    local sudo=
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# Sets PMESH: $PMESH_BIN when given (another build, to compare), else a fresh release build.
pick_pmesh() {
    if [ -n "${PMESH_BIN:-}" ]; then
        PMESH=$(realpath "$PMESH_BIN")
    else
        log "building pmesh-dev (release)"
        (cd "$REPO" && cargo build --release --quiet)
        PMESH="$REPO/target/release/pmesh-dev"
    fi
}
