"""Ships a cycle's staged blocks to the peer, from this host's qemu-storage-daemon.

The cut copies each incremental disk's dirty blocks into a local stage (see
:mod:`.primary`); the stage carries a persistent bitmap, :data:`SHIP_BITMAP`,
of exactly those blocks. Here the agent's storage daemon opens the stage,
connects to the peer's NBD export for the cycle's segment and runs
``blockdev-backup sync=bitmap`` into it. The link's TLS, its connection set-up
and its closing flush thus run in the storage daemon: none of it in the guest's
QEMU, whose main loop also serves the guest's disks.

Names in the storage daemon carry a tag of the domain (a host can ship for
several domains and serve replicas at once); none is longer than QEMU's 31.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

from qemu_blockdev import cancel_jobs, commands, nodes
from qemu_blockdev.transport import QmpTransport

SHIP_BITMAP = "vs-ship"


@dataclasses.dataclass(frozen=True)
class NbdTls:
    """TLS of NBD client nodes: QEMU reads ``dir/keys.psk`` (``username:key``)."""

    dir: str
    username: str
    priority: str | None = None
    object_id: str = "vs-tls-nbd"


async def add_tls_client(qmp: QmpTransport, tls: NbdTls | None) -> str | None:
    """Add the TLS client object of NBD nodes (QEMU re-reads keys.psk); its id, None if plain."""
    if tls is None:
        return None
    # One left behind by a killed agent would make object-add fail ("duplicate").
    await nodes.object_del(qmp, tls.object_id, missing_ok=True)
    return await nodes.object_add(qmp, commands.tls_creds_psk_args(
        tls.object_id, endpoint="client", dir=tls.dir, username=tls.username, priority=tls.priority))


def domain_tag(uuid: str) -> str:
    return hashlib.sha256(uuid.encode()).hexdigest()[:8]


class Shipper:
    """One domain's shipping in the storage daemon ``qmp``."""

    def __init__(self, qmp: QmpTransport, uuid: str, tls: NbdTls | None, speed_limit: int | None) -> None:
        self.qmp = qmp
        self.tag = domain_tag(uuid)
        self.tls = dataclasses.replace(tls, object_id=f"vs-tls-{self.tag}") if tls is not None else None
        self.speed_limit = speed_limit

    def job_name(self, target: str, seq: int) -> str:
        return commands.owned(f"vs-ship-{self.tag}-{seq}-{target}")

    def _stage(self, target: str) -> str:
        return f"vs-s{self.tag}-{target}"

    def _nbd(self, target: str) -> str:
        return f"vs-n{self.tag}-{target}"

    async def start(self, seq: int, stages: Mapping[str, str], exports: Mapping[str, str], host: str,
                    port: int) -> None:
        """Open each target's stage file and its export, and start all the ship jobs."""
        tls_creds = await add_tls_client(self.qmp, self.tls)
        actions = []
        for target, path in stages.items():
            # no-flush: opening a qcow2 with a bitmap read-write marks it in use and flushes;
            # an fdatasync of the stage would write it all to disk, under the guest's feet.
            file_node = commands.file_node(f"{self._stage(target)}-f", path, no_flush=True)
            await nodes.blockdev_add(self.qmp, commands.qcow2_node(self._stage(target), file_node, backing=None))
            await nodes.blockdev_add(self.qmp, commands.nbd_node(self._nbd(target), exports[target], host=host,
                                                                 port=port, tls_creds=tls_creds))
            actions.append(commands.action("blockdev-backup", commands.backup_args(
                self.job_name(target, seq), self._stage(target), self._nbd(target), sync="bitmap",
                bitmap=SHIP_BITMAP, bitmap_mode="never", speed=self.speed_limit)))
        await nodes.transaction(self.qmp, actions, grouped=False)

    async def close(self, targets: list[str]) -> None:
        """Cancel what still runs and drop every node and object of ours (the
        NBD node's removal flushes the segment on the peer)."""
        await cancel_jobs(self.qmp, lambda job_id: job_id.startswith(f"vs-ship-{self.tag}-"))
        for target in targets:
            for node in (self._nbd(target), self._stage(target)):  # a stage's file node goes with it
                await nodes.blockdev_del(self.qmp, node, missing_ok=True)
        if self.tls is not None:
            await nodes.object_del(self.qmp, self.tls.object_id, missing_ok=True)
