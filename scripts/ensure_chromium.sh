#!/bin/sh
# Make sure Debian's chromium is installed for the browser tests (tests/ui).
# Playwright drives it; nothing is downloaded by Playwright itself. Without root (or
# password-less sudo) this only says how to install it and exits 0: the rest of the suite
# runs and the browser tests skip.
set -eu

CHROMIUM=/usr/bin/chromium
[ -x "$CHROMIUM" ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "ensure_chromium: $CHROMIUM is missing and this user cannot install it;" >&2
    echo "  the browser tests will skip. Install it with: sudo apt-get install chromium" >&2
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: no apt-get here; install chromium at $CHROMIUM by hand" >&2
    echo "  (the browser tests skip without it)" >&2
    exit 0
fi

echo "ensure_chromium: installing Debian's chromium (apt-get)" >&2
if ! { $SUDO apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium; }; then
    echo "ensure_chromium: apt-get failed; the browser tests will skip" >&2
fi
exit 0
