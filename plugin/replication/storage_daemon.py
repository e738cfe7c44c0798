"""A qemu-storage-daemon owned by the agent: the one that ships the primary's
cycles (an NBD client only), and one per peer that serves NBD exports of that
peer's replicas (:mod:`.nbd_servers`). A serving daemon listens on the
replication address only, with TLS (a ``tls-creds-psk`` server object whose
``keys.psk`` holds the one peer's ``<peer>:<key>`` line) unless every peer is
explicitly plain. The object is added over QMP, not on the command line; it
names only a directory, so no key is ever visible in ``ps`` or QMP."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal

from qemu_blockdev import commands, nodes
from qemu_blockdev.qmp_socket import QmpSocketTransport

from ..errors import PluginError

log = logging.getLogger("virtsync.qsd")


def _prepare_child() -> None:
    """Runs in the child: the daemon ends when the agent does, even by SIGKILL,
    so a restarted agent finds its NBD address free; and it yields the CPU to
    guests (it moves replication data, which can wait a moment; a guest cannot)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.nice(NICE)


PR_SET_PDEATHSIG = 1
NICE = 10
# glibc returns each freed 1 MiB request buffer to the kernel (mmap, or a heap
# trim), so every NBD request and copy chunk faulted in and zeroed fresh pages:
# a sixth of the receiving daemon's CPU. Keep buffers below 32 MiB (the largest
# NBD request) on the heap, and up to 128 MiB of it after a burst.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}
TLS_OBJECT = "vs-tls-server"


class StorageDaemonError(PluginError):
    """qemu-storage-daemon could not be started or reached."""


class StorageDaemon:
    """Owns one qemu-storage-daemon process and its QMP connection."""

    def __init__(self, run_dir: str, address: str | None = None, port: int | None = None, *,
                 tls_dir: str | None = None, tls_priority: str | None = None, name: str = "vs-qsd") -> None:
        """:param address: where its NBD server listens; None runs no NBD server
        :param tls_dir: directory of the server's ``keys.psk``; None serves plain NBD
            (only for peers set ``insecure_plain``)"""
        self.run_dir = run_dir
        self.address = address
        self.port = port
        self.tls_dir = tls_dir
        self.tls_priority = tls_priority
        self.name = name
        self.qmp: QmpSocketTransport | None = None
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def qmp_path(self) -> str:
        return os.path.join(self.run_dir, "qsd.qmp")

    async def start(self) -> QmpSocketTransport:
        binary = shutil.which("qemu-storage-daemon")
        if binary is None:
            raise StorageDaemonError("qemu-storage-daemon not found (package qemu-system-common)")
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.qmp_path)
        log_file = open(os.path.join(self.run_dir, "qsd.log"), "ab")  # noqa: SIM115
        try:
            self._proc = await asyncio.create_subprocess_exec(
                binary, "--chardev", f"socket,id=vs-mon,path={self.qmp_path},server=on,wait=off",
                "--monitor", "chardev=vs-mon", stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
                stderr=log_file, preexec_fn=_prepare_child, env={**os.environ, **MALLOC_ENV})
        finally:
            log_file.close()
        self.qmp = QmpSocketTransport(self.qmp_path, name=self.name)
        await self.qmp.connect(timeout=10)
        os.chmod(self.qmp_path, 0o600)
        if self.address is None or self.port is None:
            log.info("qemu-storage-daemon %s pid %s (no NBD server)", self.name, self._proc.pid)
            return self.qmp
        tls_creds = None
        if self.tls_dir is not None:
            tls_creds = await nodes.object_add(self.qmp, commands.tls_creds_psk_args(
                TLS_OBJECT, endpoint="server", dir=self.tls_dir, priority=self.tls_priority))
        await nodes.nbd_server_start(self.qmp, host=self.address, port=self.port, tls_creds=tls_creds)
        log.info("qemu-storage-daemon %s pid %s serving NBD%s on %s:%s", self.name, self._proc.pid,
                 " with TLS (PSK)" if tls_creds else " in plain text (insecure_plain)", self.address, self.port)
        return self.qmp

    async def stop(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.execute("quit")
            await self.qmp.close()
        if self._proc is not None and self._proc.returncode is None:
            try:
                async with asyncio.timeout(5):
                    await self._proc.wait()
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
