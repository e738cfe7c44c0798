#!/bin/sh
# Install everything virtsync and its lab need on Debian 12; fast when done.
#   distro packages -> .venv with the Python dependencies -> lab guest kernel+initramfs
set -eu
cd "$(dirname "$0")/.."

# Every program the code runs is listed with its package in plugin/programs.py;
# tests/unit/test_programs.py checks that this list installs each of them.
PACKAGES="qemu-system-x86 qemu-utils qemu-system-common libvirt-daemon-system libvirt-clients
libvirt-dev pkg-config busybox-static iproute2 nftables gnutls-bin openssl xz-utils zstd python3-venv"

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing distro packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi

# The venv is rebuilt only when the declared dependencies change.
stamp=.venv/.virtsync-setup
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    echo "$want" > "$stamp"
fi

bash scripts/build-guest.sh
