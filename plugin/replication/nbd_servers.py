"""The secondary's NBD servers: one qemu-storage-daemon per peer, so an NBD key
opens only the exports of the replicas its peer owns.

Why one daemon per peer (checked on QEMU 7.2, ``qemu-storage-daemon`` 7.2.22):

- ``nbd-server-start``'s ``tls-authz`` does nothing with TLS-PSK: a server with
  ``authz-simple identity=pri``, or even ``authz-list policy=deny``, let a client
  with user ``evil`` and evil's key read and write an export (QEMU checks authz
  only against an x509 client certificate's distinguished name).
- ``block-export-add`` has no per-export authorization, and one daemon runs one
  NBD server, so one ``keys.psk`` serves all of its exports.
- Secret export names alone do not help: ``NBD_OPT_LIST`` (``qemu-nbd -L``) shows
  every export of the server to any client whose key passes the handshake.

So each peer gets its own daemon whose ``keys.psk`` holds that peer's key only:
any other key fails the TLS handshake before an export name is sent. Exports
exist only while a cycle the owner opened is in progress (the secondary removes
them at commit or abort), and their names carry a random part.

Ports: the peers in the order of their names take ``replication.port``,
``port + 1``, ... (with one peer, nothing changes). The port of a cycle's server
is in the ``open_cycle`` reply, so the primary needs no configuration for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qemu_blockdev import BlockdevError
from qemu_blockdev.transport import QmpTransport

from ..keys import write_server_psk
from .storage_daemon import StorageDaemon, StorageDaemonError

log = logging.getLogger("virtsync.nbd")

__all__ = ["NbdServers", "OneServer", "PeerServers"]

#: Where versions with one NBD server for all peers kept its key file (beside ``run_dir``).
LEGACY_PSK_DIR = "nbd-psk"


class NbdServers:
    """Where the exports of a peer's replicas go: its daemon's QMP and the server's port."""

    def server(self, peer: str) -> tuple[QmpTransport, int]:
        raise NotImplementedError


@dataclass
class OneServer(NbdServers):
    """One daemon for every peer: tests at the QMP boundary."""

    qmp: QmpTransport
    port: int

    def server(self, peer: str) -> tuple[QmpTransport, int]:
        return self.qmp, self.port


class PeerServers(NbdServers):
    """One serving qemu-storage-daemon per peer, under ``run_dir/<peer>/``."""

    def __init__(self, run_dir: str, address: str, base_port: int, peers: Sequence[str], *,
                 tls_priority: str | None = None) -> None:
        self.run_dir = run_dir
        self.address = address
        # Every configured peer has its port, served or not: a peer whose key is
        # missing today does not move the others' ports.
        self.ports = {peer: base_port + i for i, peer in enumerate(sorted(peers))}
        self.tls_priority = tls_priority
        self.daemons: dict[str, StorageDaemon] = {}
        self.unserved: dict[str, str] = {}

    def configure(self, keys: Mapping[str, str] | None, unserved: Mapping[str, str] | None = None) -> None:
        """A daemon for each peer of ``keys`` (peer -> hex NBD key; its ``keys.psk`` is
        written now), or for every peer in plain text when ``keys`` is None.
        ``unserved`` says why a peer has none.

        :raise StorageDaemonError: the ports run out
        """
        self.unserved = dict(unserved or {})
        too_high = [f"{p} ({port})" for p, port in self.ports.items() if port > 65535]
        if too_high:
            raise StorageDaemonError(f"replication.port leaves no NBD port for peers {', '.join(too_high)}: "
                                     "one port per peer, from replication.port up")
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        self.daemons = {}
        for peer in sorted(self.ports if keys is None else keys):
            run_dir = os.path.join(self.run_dir, peer)
            tls_dir = os.path.join(run_dir, "psk")
            if keys is not None:
                write_server_psk(tls_dir, {peer: keys[peer]})
            else:
                shutil.rmtree(tls_dir, ignore_errors=True)
            self.daemons[peer] = StorageDaemon(run_dir, self.address, self.ports[peer],
                                               tls_dir=tls_dir if keys is not None else None,
                                               tls_priority=self.tls_priority, name=f"vs-qsd-{peer}")
        # No key stays on disk for a server that does not run: a peer gone from the
        # config or without usable keys, and the single file of every key of old versions.
        for entry in os.listdir(self.run_dir):
            if entry not in self.daemons:
                shutil.rmtree(os.path.join(self.run_dir, entry), ignore_errors=True)
        shutil.rmtree(os.path.join(os.path.dirname(self.run_dir), LEGACY_PSK_DIR), ignore_errors=True)

    async def start(self) -> None:
        """Start the configured daemons, side by side.

        :raise StorageDaemonError: a daemon could not start (none is left running)
        """
        results = await asyncio.gather(*(d.start() for d in self.daemons.values()), return_exceptions=True)
        failed = [(peer, r) for peer, r in zip(self.daemons, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            await self.stop()
            peer, error = failed[0]
            if isinstance(error, (BlockdevError, StorageDaemonError)):
                raise StorageDaemonError(f"NBD server of peer {peer} on {self.address}:{self.ports[peer]} "
                                         f"could not start: {error}") from error
            raise error

    def server(self, peer: str) -> tuple[QmpTransport, int]:
        """:raise StorageDaemonError: no server runs for ``peer`` (its keys are missing)"""
        daemon = self.daemons.get(peer)
        if daemon is None or daemon.qmp is None:
            why = self.unserved.get(peer, "it is not a configured peer")
            raise StorageDaemonError(f"no NBD server for peer {peer}: {why}")
        return daemon.qmp, self.ports[peer]

    def describe(self) -> str:
        return ", ".join(f"{peer} {self.address}:{self.ports[peer]}" for peer in sorted(self.daemons)) or "none"

    async def stop(self) -> None:
        for daemon in self.daemons.values():
            with contextlib.suppress(Exception):
                await daemon.stop()
        self.daemons = {}
