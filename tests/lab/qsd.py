"""qemu-storage-daemon as a replication target, QMP over a unix socket."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

from qemu_blockdev import commands, nodes
from qemu_blockdev.qmp_socket import QmpSocketTransport

from . import procs

QSD = shutil.which("qemu-storage-daemon") or "/usr/bin/qemu-storage-daemon"


@dataclass
class StorageDaemon:
    """One qemu-storage-daemon; ``extra_args`` go on its command line (objects).

    With ``netns`` (a lab host's network namespace) it runs under ``ip netns
    exec``, so its NBD server listens on that host's addresses; ``ip netns
    exec`` execs, so :attr:`proc` is the daemon itself.
    """

    workdir: str
    name: str = "qsd"
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    netns: str | None = None

    @property
    def qmp_path(self) -> str:
        return os.path.join(self.workdir, f"{self.name}.qmp")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, f"{self.name}.log")

    def start(self) -> None:
        if os.path.exists(self.qmp_path):
            os.unlink(self.qmp_path)
        argv = [QSD, "--chardev", f"socket,id=vs-mon,path={self.qmp_path},server=on,wait=off",
                "--monitor", "chardev=vs-mon", *self.extra_args]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self.proc = procs.spawn(argv, log_path=self.log_path)
        procs.wait_for_path(self.qmp_path, 10, self.proc)

    async def connect(self) -> QmpSocketTransport:
        transport = QmpSocketTransport(self.qmp_path, name=self.name)
        await transport.connect()
        return transport

    def kill(self) -> None:
        """SIGKILL: the target dies mid-job, as a crashed host would."""
        if self.proc is not None:
            procs.end(self.proc, sig=signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            procs.end(self.proc)


async def serve_image(
    transport: QmpSocketTransport, node: str, path: str, fmt: str, export: str,
    *, backing: str | None | bool = False,
) -> None:
    """Open ``path`` in the daemon and export it writable over its NBD server."""
    file_name = f"{node}-file"
    await nodes.blockdev_add(transport, commands.file_node(file_name, path))
    if fmt == "qcow2":
        await nodes.blockdev_add(transport, commands.qcow2_node(node, file_name, backing=backing))  # type: ignore[arg-type]
    else:
        await nodes.blockdev_add(transport, commands.raw_node(node, file_name))
    await nodes.export_add(transport, f"vs-exp-{export}", node, name=export, writable=True)


async def unserve_image(transport: QmpSocketTransport, node: str, export: str) -> None:
    """Remove the export and close the image, so outside readers may open it."""
    await nodes.export_del(transport, f"vs-exp-{export}")
    await nodes.blockdev_del(transport, node)
    await nodes.blockdev_del(transport, f"{node}-file")
