#!/bin/sh
# Build the virtualenvs of the gateways the tests and benchmarks start: Jupyter Enterprise
# Gateway 3.3.0 (pins jupyter-client 6.1 and jupyter-server 1.24, so it cannot share .venv)
# and Jupyter Kernel Gateway 3.0. Each is built once; a stamp records the pinned version.
# Kernels started by these gateways run our launcher with .venv's Python (its kernelspec).
set -eu
PYTHON=${PYTHON:-python3}
ROOT=${GATEWAY_VENVS:-.gateway-venvs}

build() {  # build <name> <requirement>
    dir="$ROOT/$1"
    stamp="$dir/.stamp"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$2" ]; then
        return 0
    fi
    echo "building $dir ($2)" >&2
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    log="$dir/install.log"
    if ! "$dir/bin/python" -m pip install --quiet "$2" > "$log" 2>&1; then
        cat "$log" >&2
        exit 1
    fi
    printf '%s' "$2" > "$stamp"
}

build eg "jupyter_enterprise_gateway==3.3.0"
build kg "jupyter_kernel_gateway==3.0.1"
