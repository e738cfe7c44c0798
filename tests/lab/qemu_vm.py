"""A plain QEMU VM with N disks and no guest OS, for block-layer tests.

Guest writes come from HMP ``qemu-io`` on the device's QOM path, which writes
through the device exactly as the guest would (LAB.md). KVM is used when it
works (a BIOS-only guest runs under kvm_pvm), TCG otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field

from qemu_blockdev.qmp_socket import QmpSocketTransport

from . import procs

QEMU = "/usr/bin/qemu-system-x86_64"


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


@dataclass
class Disk:
    path: str
    fmt: str = "qcow2"


@dataclass
class PlainVM:
    """QEMU with ``disks`` as blockdev nodes ``disk0..`` behind devices ``vdisk0..``."""

    workdir: str
    disks: list[Disk]
    name: str = "vm"
    accel: str = field(default_factory=lambda: "kvm" if kvm_usable() else "tcg")
    proc: subprocess.Popen[bytes] | None = None

    @property
    def qmp_path(self) -> str:
        return os.path.join(self.workdir, f"{self.name}.qmp")

    def node(self, i: int) -> str:
        return f"disk{i}"

    def device_path(self, i: int) -> str:
        return f"/machine/peripheral/vdisk{i}/virtio-backend"

    def argv(self) -> list[str]:
        argv = [QEMU, "-name", self.name, "-nodefaults", "-display", "none", "-machine", "pc",
                "-accel", self.accel, "-m", "64",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        for i, disk in enumerate(self.disks):
            argv += ["-blockdev", f"driver=file,filename={disk.path},node-name=file{i},cache.direct=on",
                     "-blockdev", f"driver={disk.fmt},file=file{i},node-name={self.node(i)}",
                     "-device", f"virtio-blk-pci,drive={self.node(i)},id=vdisk{i}"]
        return argv

    def start(self) -> None:
        if os.path.exists(self.qmp_path):
            os.unlink(self.qmp_path)
        self.proc = procs.spawn(self.argv(), log_path=os.path.join(self.workdir, f"{self.name}.log"))
        procs.wait_for_path(self.qmp_path, 15, self.proc)

    async def connect(self) -> QmpSocketTransport:
        transport = QmpSocketTransport(self.qmp_path, name=self.name)
        await transport.connect()
        return transport

    def kill(self) -> None:
        if self.proc is not None:
            procs.end(self.proc, sig=signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            procs.end(self.proc)


async def guest_write(transport: QmpSocketTransport, vm: PlainVM, disk: int, offset: int,
                      length: int, pattern: int) -> None:
    """Write ``pattern`` bytes through disk ``disk``'s device, as the guest would."""
    cmd = f'qemu-io -d {vm.device_path(disk)} "write -P {pattern:#x} {offset} {length}"'
    reply = await transport.execute("human-monitor-command", {"command-line": cmd})
    # qemu-io reports its own errors on QEMU's stdout, not in the reply.
    if reply:
        raise RuntimeError(f"qemu-io: {reply}")
