#!/bin/sh
# Make sure Debian's PostgreSQL server is installed for the tests: tests/agent_service runs
# its store tests and the replica tests against a throwaway cluster (initdb in a temp
# folder, on a free loopback port), never against a system cluster. Nothing is started
# here, and the package's own cluster is not needed (apt's may start one; the tests ignore
# it). Without root (or password-less sudo) this only says how to install it and exits 0:
# the PostgreSQL tests then skip (and fail under CI=true).
set -eu

for initdb in /usr/lib/postgresql/*/bin/initdb; do
    [ -x "$initdb" ] && exit 0
done
command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1 && exit 0

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "ensure_postgres: PostgreSQL is missing and this user cannot install it;" >&2
    echo "  its tests will skip. Install it with: sudo apt-get install postgresql" >&2
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_postgres: no apt-get here; install PostgreSQL (initdb, pg_ctl) by hand" >&2
    echo "  (its tests skip without it)" >&2
    exit 0
fi

echo "ensure_postgres: installing Debian's postgresql (apt-get)" >&2
install() {
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql
}
if ! install; then
    # A fresh machine may have no package lists yet.
    $SUDO apt-get update -qq && install ||
        echo "ensure_postgres: apt-get failed; the PostgreSQL tests will skip" >&2
fi
exit 0
