#!/bin/sh
# Make sure bubblewrap (bwrap) is installed: every local kernel runs in its own bwrap sandbox
# (KERNEL_MCP_SANDBOX=bwrap, the default). Installs Debian's package with apt-get when run as
# root or with password-less sudo. Otherwise it only says how and exits 0: kernel_mcp then
# refuses to start with the same advice, or runs unsandboxed with KERNEL_MCP_SANDBOX=none.
set -eu

command -v bwrap >/dev/null 2>&1 && exit 0
[ "${KERNEL_MCP_SANDBOX:-bwrap}" = "none" ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "ensure_bubblewrap: bwrap is missing and this user cannot install it." >&2
    echo "  Install it with: sudo apt-get install bubblewrap" >&2
    echo "  (or run unsandboxed, at your own risk: KERNEL_MCP_SANDBOX=none)" >&2
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_bubblewrap: no apt-get here; install bubblewrap with your package manager" >&2
    exit 0
fi

echo "ensure_bubblewrap: installing Debian's bubblewrap (apt-get)" >&2
if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends bubblewrap; then
    # A fresh machine may have no package lists yet.
    $SUDO apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends bubblewrap ||
        echo "ensure_bubblewrap: apt-get failed; install bubblewrap by hand" >&2
fi
exit 0
