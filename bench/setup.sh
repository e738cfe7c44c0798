#!/bin/sh
# What `make bench` needs beyond scripts/setup.sh: virtnbdbackup (Debian 12 package),
# the peer the benchmarks compare against, and git (the report names the commit).
# Quick when they are installed.
set -eu
PACKAGES="virtnbdbackup git"

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "bench/setup: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q $missing
fi
