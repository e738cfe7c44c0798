#!/bin/bash
# build-guest.sh — build the lab's writing Linux guest (kernel + busybox initramfs).
#
# Output: ${VIRTSYNC_LAB_CACHE:-$HOME/.cache/virtsync-lab}/guest/{vmlinuz,initramfs.img}
# (+ vmlinux, the same kernel uncompressed, which boots ~2x faster under TCG via PVH)
# built only from Debian packages (the kernel that linux-image-amd64 depends on, and
# busybox-static). Idempotent: when the stamp matches (kernel version, hash of the
# guest init and of this script) it exits at once without touching apt.
#
# Environment:
#   VIRTSYNC_LAB_CACHE       cache root (default $HOME/.cache/virtsync-lab)
#   VIRTSYNC_LAB_KERNEL_PKG  kernel package to use instead of linux-image-amd64's target
#   VIRTSYNC_LAB_REBUILD=1   ignore the stamp and rebuild the initramfs
#
# Prints "vmlinuz=PATH", "vmlinux=PATH" (if extracted) and "initramfs=PATH" on success.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
init_src="$repo/tests/lab/guest/init.sh"
cache="${VIRTSYNC_LAB_CACHE:-$HOME/.cache/virtsync-lab}"
out="$cache/guest"
stamp="$out/stamp"
# Load order matters: each module only needs the ones before it. virtio_console
# (the guest agent's virtio-serial port) is loaded only with vs.qga=1.
modules=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console)

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ -f "$init_src" ] || die "guest init not found: $init_src"
mkdir -p "$out"

want_hashes() {
    # Hash of the inputs that shape the initramfs (kernel version is added by callers).
    sha256sum "$init_src" "${BASH_SOURCE[0]}" | awk '{print $1}' | tr '\n' ' '
}

fast_path() {
    # True when a previous build with the same inputs is complete.
    [ "${VIRTSYNC_LAB_REBUILD:-0}" = 1 ] && return 1
    [ -s "$stamp" ] && [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.img" ] || return 1
    local kver
    kver="$(sed -n 's/^kver=//p' "$stamp")"
    [ -n "$kver" ] || return 1
    if [ -n "${VIRTSYNC_LAB_KERNEL_PKG:-}" ] &&
        [ "$(sed -n 's/^kernel_pkg=//p' "$stamp")" != "$VIRTSYNC_LAB_KERNEL_PKG" ]; then
        return 1
    fi
    [ "$(sed -n 's/^inputs=//p' "$stamp")" = "$(want_hashes)" ]
}

done_msg() {
    echo "vmlinuz=$out/vmlinuz"
    [ ! -s "$out/vmlinux" ] || echo "vmlinux=$out/vmlinux"
    echo "initramfs=$out/initramfs.img"
}

if fast_path; then
    done_msg
    exit 0
fi

# Serialise concurrent builds (parallel test sessions share the cache).
exec 9>"$out/.lock"
flock 9
if fast_path; then
    done_msg
    exit 0
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/virtsync-guest.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

apt_download() {
    # apt-get download into $tmp/debs; refresh the package lists once on failure.
    mkdir -p "$tmp/debs"
    if ! (cd "$tmp/debs" && apt-get -q -o APT::Sandbox::User=root download "$@" >&2); then
        log "apt-get download $* failed; running apt-get update and retrying"
        apt-get -q update >&2 || true
        (cd "$tmp/debs" && apt-get -q -o APT::Sandbox::User=root download "$@" >&2) ||
            die "cannot download $*"
    fi
}

resolve_kernel_pkg() {
    # The concrete linux-image-6.1.0-*-amd64 package the meta package points to.
    local pkg
    if [ -n "${VIRTSYNC_LAB_KERNEL_PKG:-}" ]; then
        echo "$VIRTSYNC_LAB_KERNEL_PKG"
        return
    fi
    pkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 ~ /Depends:/ && $2 ~ /^linux-image-[0-9].*-amd64$/ {print $2; exit}')"
    if [ -z "$pkg" ]; then
        log "linux-image-amd64 unknown to apt-cache; running apt-get update"
        apt-get -q update >&2 || true
        pkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
            awk '$1 ~ /Depends:/ && $2 ~ /^linux-image-[0-9].*-amd64$/ {print $2; exit}')"
    fi
    [ -n "$pkg" ] || die "cannot resolve the kernel package behind linux-image-amd64"
    echo "$pkg"
}

kernel_pkg="$(resolve_kernel_pkg)"
kver="${kernel_pkg#linux-image-}"
parts="$cache/kernel/$kver"

# 1. Kernel and modules, cached per kernel version (only the few files we need);
# .complete records the module list, so a new module refetches the package.
if [ ! -e "$parts/.complete" ] || [ "$(sed -n 's/^modules=//p' "$parts/.complete")" != "${modules[*]}" ]; then
    log "fetching $kernel_pkg"
    apt_download "$kernel_pkg"
    deb="$(ls "$tmp"/debs/"${kernel_pkg}"_*.deb | head -n1)"
    mkdir -p "$tmp/kx"
    dpkg -x "$deb" "$tmp/kx"
    rm -rf "$parts.new"
    mkdir -p "$parts.new/modules"
    vmlinuz="$(ls "$tmp"/kx/boot/vmlinuz-* | head -n1)"
    [ -s "$vmlinuz" ] || die "no vmlinuz in $deb"
    cp "$vmlinuz" "$parts.new/vmlinuz"
    moddir=""
    for d in "$tmp/kx/lib/modules/$kver" "$tmp/kx/usr/lib/modules/$kver"; do
        [ -d "$d" ] && moddir="$d" && break
    done
    [ -n "$moddir" ] || die "no modules directory for $kver in $deb"
    for m in "${modules[@]}"; do
        f="$(find "$moddir/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" \
            -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) | head -n1)"
        if [ -z "$f" ]; then
            if grep -q "/$m.ko\$" "$moddir/modules.builtin" 2>/dev/null; then
                log "$m is built into the kernel"
                continue
            fi
            die "module $m not found in $deb"
        fi
        # busybox insmod cannot read compressed modules: store them plain.
        case "$f" in
        *.ko.xz) xz -dc "$f" >"$parts.new/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$parts.new/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$parts.new/modules/$m.ko" ;;
        *) cp "$f" "$parts.new/modules/$m.ko" ;;
        esac
    done
    printf '%s\nmodules=%s\n' "$kernel_pkg" "${modules[*]}" >"$parts.new/.complete"
    # Keep the extracted vmlinux (step 1b) of an older build of the same kernel.
    for f in vmlinux .no-vmlinux; do
        [ ! -e "$parts/$f" ] || mv "$parts/$f" "$parts.new/$f"
    done
    rm -rf "$parts"
    mv "$parts.new" "$parts"
fi

# 1b. The uncompressed kernel (ELF with a PVH entry point): QEMU boots it directly,
# skipping the in-guest xz decompression that takes ~3 s under TCG.
if [ ! -s "$parts/vmlinux" ] && [ ! -e "$parts/.no-vmlinux" ]; then
    off="$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$parts/vmlinuz" | head -n1 | cut -d: -f1 || true)"
    if [ -n "$off" ]; then
        # xz stops after its stream, so tail may die of SIGPIPE: judge by the output.
        tail -c +"$((off + 1))" "$parts/vmlinuz" |
            xz -dcq --single-stream >"$parts/vmlinux.new" 2>/dev/null || true
    fi
    if [ -s "$parts/vmlinux.new" ] &&
        [ "$(head -c 4 "$parts/vmlinux.new" | od -An -c | tr -d ' ')" = '177ELF' ]; then
        mv "$parts/vmlinux.new" "$parts/vmlinux"
    else
        log "could not extract an ELF vmlinux (not xz?); guests boot vmlinuz"
        rm -f "$parts/vmlinux.new"
        touch "$parts/.no-vmlinux"
    fi
fi

# 2. A static busybox (host's if busybox-static is installed, else from the package).
if dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' &&
    [ -x /bin/busybox ]; then
    busybox=/bin/busybox
else
    log "fetching busybox-static"
    apt_download busybox-static
    mkdir -p "$tmp/bx"
    dpkg -x "$(ls "$tmp"/debs/busybox-static_*.deb | head -n1)" "$tmp/bx"
    busybox="$tmp/bx/bin/busybox"
    [ -x "$busybox" ] || die "no bin/busybox in busybox-static"
fi

# 3. The initramfs: /init, /bin/busybox, plain .ko files; applet links made at boot.
root="$tmp/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,lib/modules}
cp "$busybox" "$root/bin/busybox"
cp "$init_src" "$root/init"
chmod 0755 "$root/init" "$root/bin/busybox"
if compgen -G "$parts/modules/*.ko" >/dev/null; then
    cp "$parts"/modules/*.ko "$root/lib/modules/"
fi
(cd "$root" && find . | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) |
    gzip -n -6 >"$tmp/initramfs.img"
[ -s "$tmp/initramfs.img" ] || die "empty initramfs"

install_file() {
    # Hard link when possible (vmlinux is ~66 MB), atomically replacing $2.
    rm -f "$2.new"
    [ ! "$1" -ef "$2" ] || return 0
    ln "$1" "$2.new" 2>/dev/null || cp "$1" "$2.new"
    mv "$2.new" "$2"
}
install_file "$parts/vmlinuz" "$out/vmlinuz"
if [ -s "$parts/vmlinux" ]; then
    install_file "$parts/vmlinux" "$out/vmlinux"
else
    rm -f "$out/vmlinux"
fi
mv "$tmp/initramfs.img" "$out/initramfs.img.new"
mv "$out/initramfs.img.new" "$out/initramfs.img"
printf 'kernel_pkg=%s\nkver=%s\ninputs=%s\n' "$kernel_pkg" "$kver" "$(want_hashes)" \
    >"$stamp.new"
mv "$stamp.new" "$stamp"
log "built guest for $kver in $out"
done_msg
