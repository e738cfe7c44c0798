#!/bin/sh
# What `make bench` needs beyond scripts/setup.sh: virtnbdbackup (Debian 12 package),
# the peer the benchmarks compare against. Quick when it is installed.
set -eu
if ! command -v virtnbdbackup >/dev/null 2>&1; then
    echo "bench/setup: installing virtnbdbackup"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q virtnbdbackup
fi
