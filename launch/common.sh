# Shared by the launch scripts; sourced, not run.
# shellcheck shell=bash

SFRON_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SFRON_ENV_FILE=$SFRON_ROOT/target/sfron-env.sh

say() { printf '[sfron] %s\n' "$*"; }
die() { printf '[sfron] error: %s\n' "$*" >&2; exit 2; }

# Loads what launch/setup resolved (libtorch, python, MPI flags).
load_env() {
    [ -f "$SFRON_ENV_FILE" ] || die "$SFRON_ENV_FILE is missing: run launch/setup first"
    # shellcheck source=/dev/null
    . "$SFRON_ENV_FILE"
}

# sfron_mpirun NP ARGS...: mpirun with the flags this MPI needs on a small box
# (Open MPI: --oversubscribe so 2-3 ranks run on 2 cores).
sfron_mpirun() {
    local np=$1; shift
    local launcher=${MPIRUN:-mpirun}
    local extra=()
    if "$launcher" --version 2>/dev/null | grep -q "Open MPI"; then
        extra+=(--oversubscribe)
    fi
    "$launcher" "${extra[@]}" -np "$np" "$@"
}
