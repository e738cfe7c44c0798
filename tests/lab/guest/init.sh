#!/bin/busybox sh
# /init of the virtsync lab guest: writes stamped 4 KiB blocks to its virtio disks.
#
# Kernel command line parameters:
#   vs.disks=N   number of virtio disks (vda, vdb, ...)         default 1
#   vs.blocks=B  4 KiB blocks used per disk, from block 0        default 1024
#   vs.count=C   number of writes, 0 = forever                   default 0
#   vs.start=S   first sequence number                           default 1
#   vs.rate=R    at most R writes per second (optional)
#   vs.qga=1     run a minimal QEMU guest agent (see vs_qga_main)     default 0
#   vs.qga=hang  the same, but a freeze is never answered (it does freeze)
#
# Write seq goes to disk seq % N, block mix(seq) % B; the block is one 64-byte stamp
# line repeated 64 times, written with one dd (O_DIRECT) per write.
# tests/lab/stamps.py is the oracle and must match this file bit for bit: its unit
# tests source this file with VS_SOURCE_ONLY=1 and compare.
#
# Console protocol: VS-READY, VS-PROGRESS seq=<n> (every 100 writes and at the end),
# VS-DONE seq=<last>, VS-ERROR <reason>; with vs.qga=1 also VS-QGA port=<dev>,
# VS-QGA-RX <request> (each request the agent got), VS-FROZEN seq=<last written>
# and VS-THAWED.

# vs_mix SEQ: set VS_MIX to the splitmix64 finalizer of SEQ, masked to 63 bits.
# ash arithmetic is signed 64-bit: '*' and '+' wrap like uint64, but '>>' is
# arithmetic, so every right shift is masked to make it a logical shift.
vs_mix() {
    _z=$(( $1 + 0x9E3779B97F4A7C15 ))
    _z=$(( (_z ^ ((_z >> 30) & 0x3FFFFFFFF)) * 0xBF58476D1CE4E5B9 ))
    _z=$(( (_z ^ ((_z >> 27) & 0x1FFFFFFFFF)) * 0x94D049BB133111EB ))
    VS_MIX=$(( (_z ^ ((_z >> 31) & 0x1FFFFFFFF)) & 0x7FFFFFFFFFFFFFFF ))
}

# vs_make_block DISK BLOCK SEQ: set VS_BLOCK to the 4096-byte block of write SEQ.
# One stamp line is exactly 64 bytes:
#   "VSBLK1 d=DD b=BBBBBBBB s=SSSSSSSSSSSS c=CCCCCCCCCC" + 13 spaces + "\n"
# (zero-padded decimals; c = low 32 bits of a mix of the three numbers), repeated
# 64 times. Zero padding by adding 10^width and dropping the leading 1, and the
# block by doubling a string: pure parameter expansion, no fork. Measured under
# TCG this is cheaper than one printf with 256 arguments (~2.5 ms per block).
vs_make_block() {
    vs_mix $(( $3 ^ ($2 << 20) ^ ($1 << 52) ))
    _c=$(( (VS_MIX & 0xFFFFFFFF) + 10000000000 ))
    _s=$(( $3 + 1000000000000 ))
    _b=$(( $2 + 100000000 ))
    _d=$(( $1 + 100 ))
    VS_BLOCK="VSBLK1 d=${_d#1} b=${_b#1} s=${_s#1} c=${_c#1}             
"
    VS_BLOCK="$VS_BLOCK$VS_BLOCK"; VS_BLOCK="$VS_BLOCK$VS_BLOCK"
    VS_BLOCK="$VS_BLOCK$VS_BLOCK"; VS_BLOCK="$VS_BLOCK$VS_BLOCK"
    VS_BLOCK="$VS_BLOCK$VS_BLOCK"; VS_BLOCK="$VS_BLOCK$VS_BLOCK"
}

# vs_write DEV BLOCK: write VS_BLOCK to 4 KiB block BLOCK of DEV with one dd.
# The here-document (block minus its last newline, which the here-document adds
# back) feeds dd through a pipe: no temporary file, ~1.5x the rate of
# "printf > file; dd if=file" under TCG. VS_DD_OPTS lets tests drop O_DIRECT.
VS_DD_OPTS="oflag=direct conv=notrunc"
vs_write() {
    # shellcheck disable=SC2086
    dd of="$1" bs=4096 seek="$2" count=1 iflag=fullblock $VS_DD_OPTS 2>/dev/null <<VS_EOF
${VS_BLOCK%?}
VS_EOF
}

# vs_now: set VS_NOW to the uptime in centiseconds (no fork).
vs_now() {
    read -r _up _rest </proc/uptime
    _f=${_up#*.}
    VS_NOW=$(( ${_up%.*} * 100 + ${_f#0} ))
}

# -- a minimal QEMU guest agent (vs.qga=1) -------------------------------------
# Serves the virtio-serial port named org.qemu.guest_agent.0 with the commands
# libvirt uses for a filesystem freeze. "Freezing" stops the writer: the agent
# creates VS_FREEZE, the writer (which checks it before each write) answers in
# VS_FROZEN with the last sequence number it wrote and waits until VS_FREEZE is
# gone. So when the freeze reply leaves the guest, no write is in flight and
# the disks hold exactly writes start..VS-FROZEN seq.
VS_QGA_NAME=org.qemu.guest_agent.0
VS_FREEZE=/tmp/vs-freeze
VS_FROZEN=/tmp/vs-frozen

# vs_qga_port: set VS_QGA_DEV to the port's device node (the name appears when
# the host has announced it).
vs_qga_port() {
    for _p in /sys/class/virtio-ports/*; do
        [ -r "$_p/name" ] || continue
        read -r _n <"$_p/name" || continue
        if [ "$_n" = "$VS_QGA_NAME" ] && [ -c "/dev/${_p##*/}" ]; then
            VS_QGA_DEV=/dev/${_p##*/}
            return 0
        fi
    done
    return 1
}

# vs_qga_id REQUEST: set VS_ID to the "id" argument of a guest-sync request.
vs_qga_id() {
    VS_ID=${1#*\"id\"}
    VS_ID=${VS_ID#*:}
    while [ "${VS_ID# }" != "$VS_ID" ]; do VS_ID=${VS_ID# }; done
    VS_ID=${VS_ID%%[!0-9]*}
    [ -n "$VS_ID" ] || VS_ID=0
}

# vs_qga_freeze: stop the writer and report where it stopped.
vs_qga_freeze() {
    rm -f "$VS_FROZEN"
    : >"$VS_FREEZE"
    _t=0 _s=
    while [ "$_t" -lt 1000 ]; do
        if [ -s "$VS_FROZEN" ] && read -r _s <"$VS_FROZEN" && [ -n "$_s" ]; then
            break
        fi
        [ -d "/proc/$VS_WRITER" ] || break   # the writer is done: nothing writes
        usleep 5000
        _t=$((_t + 1))
    done
    echo "VS-FROZEN seq=${_s:-?}"
}

# vs_qga_shutdown: guest-shutdown as an OS would do it: the writer stops, the
# disks are synced, the machine powers off (libvirt waits for QEMU's SHUTDOWN
# event, not for a reply). VS-SHUTDOWN seq=<last write> says where it stopped.
vs_qga_shutdown() {
    vs_qga_freeze >/dev/null
    sync
    echo "VS-SHUTDOWN seq=${_s:-?}"
    poweroff -f
}

vs_qga_thaw() {
    rm -f "$VS_FREEZE" "$VS_FROZEN"
    echo "VS-THAWED"
}

# vs_qga_handle REQUEST: the reply on fd 3 (one JSON line).
vs_qga_handle() {
    case "$1" in
    *'"guest-sync-delimited"'*) vs_qga_id "$1"; printf '\377{"return": %s}\n' "$VS_ID" >&3 ;;
    *'"guest-sync"'*) vs_qga_id "$1"; printf '{"return": %s}\n' "$VS_ID" >&3 ;;
    *'"guest-ping"'*) printf '{"return": {}}\n' >&3 ;;
    *'"guest-fsfreeze-freeze"'*)
        vs_qga_freeze
        # vs.qga=hang: frozen, but the answer never comes (a hung agent)
        [ -n "$VS_QGA_HANG" ] || printf '{"return": 1}\n' >&3 ;;
    *'"guest-fsfreeze-thaw"'*) vs_qga_thaw; printf '{"return": 1}\n' >&3 ;;
    *'"guest-shutdown"'*) vs_qga_shutdown ;;
    *'"guest-fsfreeze-status"'*)
        if [ -e "$VS_FREEZE" ]; then _st=frozen; else _st=thawed; fi
        printf '{"return": "%s"}\n' "$_st" >&3 ;;
    *'"guest-info"'*)
        _c=
        for _n in guest-sync-delimited guest-sync guest-ping guest-info guest-fsfreeze-freeze \
            guest-fsfreeze-thaw guest-fsfreeze-status guest-shutdown; do
            _c="$_c${_c:+, }{\"name\": \"$_n\", \"enabled\": true, \"success-response\": true}"
        done
        printf '{"return": {"version": "7.2.0", "supported_commands": [%s]}}\n' "$_c" >&3 ;;
    *) printf '{"error": {"class": "CommandNotFound", "desc": "The command is not supported by the virtsync lab agent"}}\n' >&3 ;;
    esac
}

# vs_qga_main: serve the port forever. A read returns EOF while no host-side
# client (libvirt) is connected; the port stays open all along, because libvirt
# connects only once the guest has opened it (QEMU's VSERPORT_CHANGE event).
vs_qga_main() {
    _t=0
    until vs_qga_port; do
        _t=$((_t + 1))
        [ "$_t" -le 200 ] || { echo "VS-WARN no virtio port $VS_QGA_NAME"; return 1; }
        usleep 50000
    done
    exec 3<>"$VS_QGA_DEV" || { echo "VS-WARN cannot open $VS_QGA_DEV"; return 1; }
    echo "VS-QGA port=$VS_QGA_DEV"
    while :; do
        if IFS= read -r _req <&3; then
            # libvirt may send a 0xFF byte (resync) before a request: keep the JSON only.
            case "$_req" in \{*) ;; *\{*) _req="{${_req#*\{}" ;; *) continue ;; esac
            echo "VS-QGA-RX $_req"
            vs_qga_handle "$_req"
        else
            usleep 100000
        fi
    done
}

# vs_wait_thaw SEQ: called by the writer before write SEQ while VS_FREEZE exists.
vs_wait_thaw() {
    echo "$(( $1 - 1 ))" >"$VS_FROZEN"
    while [ -e "$VS_FREEZE" ]; do
        usleep 5000
    done
}

vs_fail() {
    echo "VS-ERROR $*"
    sync
    poweroff -f
    exit 1
}

vs_main() {
    export PATH=/bin:/sbin
    /bin/busybox mount -t proc proc /proc
    /bin/busybox mount -t sysfs sysfs /sys
    /bin/busybox mount -t devtmpfs devtmpfs /dev
    /bin/busybox --install -s /bin
    exec </dev/console >/dev/console 2>&1

    disks=1 blocks=1024 count=0 start=1 rate=0 qga=0
    read -r cmdline </proc/cmdline
    for w in $cmdline; do
        case "$w" in
        vs.disks=*) disks=${w#*=} ;;
        vs.blocks=*) blocks=${w#*=} ;;
        vs.count=*) count=${w#*=} ;;
        vs.start=*) start=${w#*=} ;;
        vs.rate=*) rate=${w#*=} ;;
        vs.qga=*) qga=${w#*=} ;;
        esac
    done
    if [ "$qga" = hang ]; then qga=1 VS_QGA_HANG=1; fi

    mods="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk"
    [ "$qga" != 1 ] || mods="$mods virtio_console"
    for m in $mods; do
        if [ -f "/lib/modules/$m.ko" ]; then
            insmod "/lib/modules/$m.ko" || echo "VS-WARN insmod $m failed"
        fi
    done
    [ "$disks" -ge 1 ] && [ "$disks" -le 26 ] || vs_fail "bad vs.disks=$disks"
    [ "$blocks" -ge 1 ] && [ "$blocks" -le 99999999 ] || vs_fail "bad vs.blocks=$blocks"

    # Map disk index -> device node, waiting for the nodes to appear.
    i=0
    for l in a b c d e f g h i j k l m n o p q r s t u v w x y z; do
        [ "$i" -lt "$disks" ] || break
        dev=/dev/vd$l
        tries=0
        while [ ! -b "$dev" ]; do
            tries=$((tries + 1))
            [ "$tries" -le 200 ] || vs_fail "no $dev"
            usleep 50000
        done
        eval "VS_DEV_$i=$dev"
        i=$((i + 1))
    done

    if [ "$qga" = 1 ]; then
        VS_WRITER=$$
        vs_qga_main &
    fi
    echo "VS-READY disks=$disks blocks=$blocks count=$count start=$start rate=$rate"
    seq=$start
    n=0
    if [ "$rate" -gt 0 ]; then
        vs_now
        t0=$VS_NOW
    fi
    while [ "$count" -eq 0 ] || [ "$n" -lt "$count" ]; do
        [ "$qga" != 1 ] || [ ! -e "$VS_FREEZE" ] || vs_wait_thaw "$seq"
        d=$((seq % disks))
        vs_mix "$seq"
        b=$((VS_MIX % blocks))
        vs_make_block "$d" "$b" "$seq"
        eval "dev=\$VS_DEV_$d"
        vs_write "$dev" "$b" || vs_fail "dd failed seq=$seq dev=$dev block=$b"
        n=$((n + 1))
        [ $((n % 100)) -ne 0 ] || echo "VS-PROGRESS seq=$seq"
        if [ "$rate" -gt 0 ]; then
            vs_now
            ahead=$((t0 + n * 100 / rate - VS_NOW))
            [ "$ahead" -le 0 ] || usleep $((ahead * 10000))
        fi
        seq=$((seq + 1))
    done
    last=$((seq - 1))
    sync
    echo "VS-PROGRESS seq=$last"
    echo "VS-DONE seq=$last"
    poweroff -f
    exit 1
}

if [ -z "${VS_SOURCE_ONLY:-}" ]; then
    vs_main
fi
