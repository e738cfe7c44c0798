"""Boot the lab's writing Linux guest under plain QEMU or libvirt.

The guest (scripts/build-guest.sh, tests/lab/guest/init.sh) writes stamped blocks
that tests/lab/stamps.py can verify. This module builds the kernel command line, the
qemu-system-x86_64 argv and the libvirt domain XML for it, and reads its console log.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import procs

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-guest.sh"
QEMU = "qemu-system-x86_64"

_PROGRESS_RE = re.compile(rb"VS-(?:PROGRESS|DONE) seq=(\d+)")


def cache_dir() -> Path:
    """Where build-guest.sh puts the kernel and initramfs."""
    root = os.environ.get("VIRTSYNC_LAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "virtsync-lab")
    return Path(root) / "guest"


@dataclass(frozen=True)
class GuestImages:
    """Kernel and initramfs of the writing guest.

    ``kernel`` is what to boot: the uncompressed ELF ``vmlinux`` when the build could
    extract it (QEMU boots it through PVH and skips the in-guest xz decompression,
    ~3 s of the ~6 s boot under TCG), else ``vmlinuz``. Set
    VIRTSYNC_LAB_GUEST_KERNEL=vmlinuz to force the compressed one.
    """

    kernel: Path
    initrd: Path
    vmlinuz: Path

    def install(self, dest: str | os.PathLike[str]) -> GuestImages:
        """Hard-link (or copy) the files into ``dest`` and return the new paths.

        For libvirt under Debian's qemu.conf QEMU runs as libvirt-qemu and cannot
        traverse /root (where the cache usually lives): give it a readable place.
        """
        dest_dir = Path(dest)
        dest_dir.mkdir(parents=True, exist_ok=True)
        placed = []
        for src in (self.kernel, self.initrd, self.vmlinuz):
            dst = dest_dir / src.name
            if not (dst.exists() and dst.samefile(src)):
                dst.unlink(missing_ok=True)
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            dst.chmod(0o644)
            placed.append(dst)
        return GuestImages(*placed)


def build_guest(timeout: float = 600.0) -> GuestImages:
    """Run build-guest.sh (~10 ms when cached) and return the built files."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"build-guest.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    vmlinuz = Path(out["vmlinuz"])
    kernel = vmlinuz
    if "vmlinux" in out and os.environ.get("VIRTSYNC_LAB_GUEST_KERNEL", "") != "vmlinuz":
        kernel = Path(out["vmlinux"])
    return GuestImages(kernel, Path(out["initramfs"]), vmlinuz)


def qemu_available() -> bool:
    """True when qemu-system-x86_64 and qemu-img are on PATH."""
    return shutil.which(QEMU) is not None and shutil.which("qemu-img") is not None


def pick_accel() -> str:
    """Accelerator for Linux guests: $VIRTSYNC_LAB_ACCEL, else "tcg".

    On the lab machines /dev/kvm exists (kvm_pvm) but a Linux kernel does not boot
    under it (emulation failures, see LAB.md), so TCG is the default; set
    VIRTSYNC_LAB_ACCEL=kvm where KVM is known to work.
    """
    return os.environ.get("VIRTSYNC_LAB_ACCEL", "").strip() or "tcg"


def guest_cmdline(
    disks: int,
    blocks: int,
    count: int = 0,
    start: int = 1,
    rate: int | None = None,
    extra: str = "",
    qga: bool | Literal["hang"] = False,
) -> str:
    """Kernel command line for the writer (serial console, quiet, die on panic).

    ``qga=True`` runs the guest's minimal QEMU guest agent (init.sh ``vs_qga_main``) on
    the virtio-serial port ``org.qemu.guest_agent.0`` (``domain_xml(qga=True)``);
    ``qga="hang"`` the same agent, which freezes but never answers a freeze.
    """
    parts = [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        f"vs.disks={disks}",
        f"vs.blocks={blocks}",
        f"vs.count={count}",
        f"vs.start={start}",
    ]
    if rate:
        parts.append(f"vs.rate={rate}")
    if qga:
        parts.append(f"vs.qga={'hang' if qga == 'hang' else 1}")
    if extra:
        parts.append(extra)
    return " ".join(parts)


@dataclass(frozen=True)
class Disk:
    """One guest disk: image path and its format ("qcow2", "raw")."""

    path: str
    fmt: str = "qcow2"


@dataclass
class GuestSpec:
    """Everything needed to start the writer under plain QEMU.

    ``style="blockdev"`` gives nodes ``file<i>`` (protocol) and ``disk<i>`` (format)
    that QMP block jobs can address; ``style="drive"`` uses legacy ``-drive`` with ids
    ``drive<i>``. In both styles the device is ``virtio-disk<i>`` (libvirt's naming),
    so the QOM path ``/machine/peripheral/virtio-disk<i>/virtio-backend`` works.
    ``direct=False`` drops O_DIRECT for images on tmpfs.
    """

    kernel: str
    initrd: str
    disks: list[Disk]
    blocks: int
    count: int = 0
    start: int = 1
    rate: int | None = None
    serial_log: str = "guest.log"
    qmp_socket: str | None = None
    memory_mib: int = 256
    accel: str | None = None
    style: str = "blockdev"
    direct: bool = True
    extra_args: list[str] = field(default_factory=list)

    def cmdline(self) -> str:
        """Kernel command line for this spec."""
        return guest_cmdline(len(self.disks), self.blocks, self.count, self.start, self.rate)


def _opt_escape(value: str) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return value.replace(",", ",,")


def disk_args(disks: Sequence[Disk], style: str = "blockdev", direct: bool = True) -> list[str]:
    """-blockdev/-drive and -device arguments for virtio-blk disks vda, vdb, ..."""
    args: list[str] = []
    for i, disk in enumerate(disks):
        path = _opt_escape(disk.path)
        if style == "blockdev":
            direct_opt = "on" if direct else "off"
            args += [
                "-blockdev",
                f"driver=file,filename={path},node-name=file{i},cache.direct={direct_opt}",
                "-blockdev",
                f"driver={disk.fmt},file=file{i},node-name=disk{i}",
                "-device",
                f"virtio-blk-pci,drive=disk{i},id=virtio-disk{i}",
            ]
        elif style == "drive":
            cache = "none" if direct else "writeback"
            args += [
                "-drive",
                f"if=none,id=drive{i},file={path},format={disk.fmt},cache={cache},aio=threads",
                "-device",
                f"virtio-blk-pci,drive=drive{i},id=virtio-disk{i}",
            ]
        else:
            raise ValueError(f"unknown disk style {style!r}")
    return args


def qemu_argv(spec: GuestSpec) -> list[str]:
    """The qemu-system-x86_64 argv that boots the writer as described by ``spec``.

    -nodefaults keeps out the NIC (and its option ROM) and VGA: only the serial
    console and the disks exist. -no-reboot turns the guest's poweroff/panic into a
    QEMU exit.
    """
    argv = [
        QEMU,
        "-nodefaults",
        "-display",
        "none",
        "-accel",
        spec.accel or pick_accel(),
        "-m",
        str(spec.memory_mib),
        "-no-reboot",
        "-kernel",
        spec.kernel,
        "-initrd",
        spec.initrd,
        "-append",
        spec.cmdline(),
        "-chardev",
        f"file,id=vs-serial,path={_opt_escape(spec.serial_log)}",
        "-serial",
        "chardev:vs-serial",
    ]
    if spec.qmp_socket:
        argv += ["-qmp", f"unix:{_opt_escape(spec.qmp_socket)},server=on,wait=off"]
    argv += disk_args(spec.disks, spec.style, spec.direct)
    argv += spec.extra_args
    return argv


def launch(spec: GuestSpec, stdout_path: str | None = None) -> subprocess.Popen[bytes]:
    """Start QEMU for ``spec`` (ended at exit by tests.lab.procs if not before).

    QEMU's own stdout/stderr (not the guest console) go to ``stdout_path``.
    """
    Path(spec.serial_log).parent.mkdir(parents=True, exist_ok=True)
    return procs.spawn(qemu_argv(spec), log_path=stdout_path)


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """End a QEMU started by ``launch`` (SIGTERM, then SIGKILL); return its exit code."""
    procs.end(proc, timeout=timeout)
    return proc.returncode


def domain_xml(
    name: str,
    kernel: str,
    initrd: str,
    cmdline: str,
    disks: Sequence[Disk | tuple[str, str]],
    type: str = "qemu",
    memory_mib: int = 256,
    serial_log: str | None = None,
    qga: bool = False,
) -> str:
    """libvirt domain XML for the writer.

    ``qga=True`` adds the guest agent's channel (virtio-serial port
    ``org.qemu.guest_agent.0``, a unix socket libvirt places and connects to).

    ``<acpi/>`` is required: without it ``poweroff -f`` halts the guest but the
    domain keeps running. ``type="qemu"`` is TCG (Linux does not boot under KVM here).
    Disks are virtio vda, vdb, ... with cache='none'; libvirt names them
    virtio-disk0, virtio-disk1, ...
    """
    dom = ET.Element("domain", type=type)
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_el, "kernel").text = kernel
    ET.SubElement(os_el, "initrd").text = initrd
    ET.SubElement(os_el, "cmdline").text = cmdline
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "destroy"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    for i, item in enumerate(disks):
        disk = item if isinstance(item, Disk) else Disk(*item)
        if i >= 26:
            raise ValueError("at most 26 disks (vda..vdz)")
        d = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(d, "driver", name="qemu", type=disk.fmt, cache="none")
        ET.SubElement(d, "source", file=disk.path)
        ET.SubElement(d, "target", dev=f"vd{chr(ord('a') + i)}", bus="virtio")
    if serial_log:
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=serial_log)
        ET.SubElement(serial, "target", port="0")
        console = ET.SubElement(devices, "console", type="file")
        ET.SubElement(console, "source", path=serial_log)
        ET.SubElement(console, "target", type="serial", port="0")
    else:
        serial = ET.SubElement(devices, "serial", type="pty")
        ET.SubElement(serial, "target", port="0")
    if qga:
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    ET.SubElement(devices, "memballoon", model="none")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def read_log(log_path: str | os.PathLike[str]) -> bytes:
    """The console log so far (empty if it does not exist yet)."""
    try:
        with open(log_path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def wait_for_console(
    log_path: str | os.PathLike[str],
    pattern: str | bytes,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    poll: float = 0.05,
) -> re.Match[bytes]:
    """Wait until the console log matches ``pattern`` (a regex) and return the match.

    Fails early with the log tail when ``proc`` (the QEMU) exits first, or on
    "VS-ERROR"; raises TimeoutError after ``timeout`` seconds.
    """
    rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
    deadline = time.monotonic() + timeout
    while True:
        data = read_log(log_path)
        m = rx.search(data)
        if m:
            return m
        if b"VS-ERROR" in data and b"VS-ERROR" not in rx.pattern:
            raise RuntimeError(f"guest reported an error:\n{_tail(data)}")
        if proc is not None and proc.poll() is not None:
            data = read_log(log_path)
            m = rx.search(data)
            if m:
                return m
            raise RuntimeError(f"QEMU exited ({proc.returncode}) before {rx.pattern!r}:\n{_tail(data)}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no {rx.pattern!r} in {log_path} after {timeout}s:\n{_tail(data)}")
        time.sleep(poll)


def last_progress(log_path: str | os.PathLike[str]) -> int | None:
    """Highest seq the guest reported (VS-PROGRESS/VS-DONE), None before any."""
    seqs = [int(m[1]) for m in _PROGRESS_RE.finditer(read_log(log_path))]
    return max(seqs) if seqs else None


def shutdown_seq(log_path: str | os.PathLike[str]) -> int:
    """The last write of a guest shut down through its agent (VS-SHUTDOWN on its console)."""
    m = re.search(rb"VS-SHUTDOWN seq=(\d+)", read_log(log_path))
    if not m:
        raise RuntimeError(f"no VS-SHUTDOWN in {log_path}:\n{_tail(read_log(log_path))}")
    return int(m.group(1))


def _tail(data: bytes, lines: int = 30) -> str:
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
