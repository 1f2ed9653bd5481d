# The project's virtualenv, shared by scripts/run and scripts/test (source it, then call
# ensure_venv). One .venv with every extra, installed from uv.lock, so CI, a developer and
# production install the same bytes; installed again only when uv.lock or pyproject.toml
# (its list of packages) changed.
# shellcheck shell=bash

UV_VERSION="0.13.9"
EXTRAS=(embedded test bench)
STAMP=".venv/.payguard-install"

find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3 python3.14 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

ensure_venv() {
    if [ ! -x .venv/bin/python ]; then
        local python
        if ! python="$(find_python)"; then
            echo "Payguard needs Python 3.11 or newer: none found as python3, python3.11 ... python3.14." >&2
            echo "Install one, or point PYTHON at it: PYTHON=/path/to/python3.11 $0" >&2
            exit 1
        fi
        echo "Creating .venv with $("$python" --version 2>&1) ($(command -v "$python"))" >&2
        if ! "$python" -m venv .venv; then
            rm -rf .venv
            echo "Could not create .venv (on Debian/Ubuntu: apt install python3-venv)." >&2
            exit 1
        fi
    elif ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo ".venv does not hold a working Python 3.11 or newer; remove it (rm -rf .venv) and run $0 again." >&2
        exit 1
    fi
    local want
    want="$(.venv/bin/python -c 'import hashlib, sys
locked = open("uv.lock", "rb").read() + open("pyproject.toml", "rb").read()
print(hashlib.sha256(locked + " ".join(sys.argv[1:]).encode()).hexdigest())' \
        "$UV_VERSION" "${EXTRAS[@]}")"
    if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
        echo "Installing Payguard and its locked dependencies into .venv (uv.lock or pyproject.toml changed, or first run)" >&2
        if [ ! -x .venv/bin/uv ] || [ "$(.venv/bin/uv --version 2>/dev/null)" != "uv $UV_VERSION" ]; then
            .venv/bin/python -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
        fi
        local extra_args=()
        local extra
        for extra in "${EXTRAS[@]}"; do extra_args+=(--extra "$extra"); done
        # --locked: refuse a uv.lock that no longer matches pyproject.toml (run `uv lock`);
        # --inexact: keep uv itself, which the lock does not list.
        UV_PROJECT_ENVIRONMENT=.venv .venv/bin/uv sync --quiet --locked --inexact \
            --python .venv/bin/python "${extra_args[@]}"
        echo "$want" >"$STAMP"
    fi
}
