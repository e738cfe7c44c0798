"""The primary's side of a repair, at the QMP boundary (fake QMP, fake peer): the
ranges the secondary names are marked dirty in the recording generation, and
only well-formed ranges inside the disk are taken.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from plugin.domain import DiskSpec
from plugin.replication.primary import DomainReplicator
from plugin.state import Store
from tests.fakes.fake_qmp import FakeQmp

MiB = 1 << 20
NODE = {"node-name": "n0", "drv": "qcow2", "ro": False, "file": "/x", "encrypted": False,
        "backing_file_depth": 0, "iops": 0, "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops_rd": 0, "iops_wr": 0,
        "detect_zeroes": "off", "write_threshold": 0, "cache": {"writeback": True, "direct": False, "no-flush": False},
        "image": {"filename": "/x", "format": "qcow2", "virtual-size": 8 * MiB},
        "dirty-bitmaps": [{"name": "vs-g3", "recording": True, "persistent": True, "busy": False,
                           "granularity": 65536, "count": 0}]}


class Peer:
    def __init__(self, repair: Any) -> None:
        self.repair = repair

    async def call(self, op: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        assert op == "info"
        return {"last_marker": 3, "repair": self.repair}


def replicator(tmp_path: Path, qmp: FakeQmp, repair: Any) -> DomainReplicator:
    return DomainReplicator(store=Store(str(tmp_path / "s.db")), peer=Peer(repair), qmp=qmp,  # type: ignore[arg-type]
                            uuid="u", domain="web01", disks=[DiskSpec("vda", "/x", "qcow2", 8 * MiB, "n0")],
                            scratch=str(tmp_path), shipper=qmp, cycle_timeout=5, stall_after=5)


def scripted() -> FakeQmp:
    qmp = FakeQmp()
    qmp.on("query-named-block-nodes", {"return": [NODE]})
    qmp.on("query-jobs", {"return": []})
    for command in ("blockdev-add", "block-dirty-bitmap-add", "block-dirty-bitmap-merge", "blockdev-del"):
        qmp.on(command)
    qmp.on("human-monitor-command", {"return": ""})
    return qmp


def repair_commands(qmp: FakeQmp) -> list[tuple[str, dict[str, Any]]]:
    """What was sent beside the first reconcile's sweep of cycle leftovers and its queries."""
    return [(c, a) for c, a in qmp.sent if c not in ("query-named-block-nodes", "query-jobs")
            and not (c == "blockdev-del" and not a["node-name"].startswith("vs-repair-"))]


def test_damaged_ranges_are_marked_dirty_for_the_next_cut(tmp_path: Path) -> None:
    qmp = scripted()
    rep = replicator(tmp_path, qmp, {"vda": [[MiB, MiB], [-1, 5], [7 * MiB, 2 * MiB], "x", [4 * MiB, 1, 2],
                                             [6 * MiB, MiB]], "vdz": [[0, MiB]]})
    assert asyncio.run(rep.reconcile()) == 3
    repair = repair_commands(qmp)
    assert repair == [
        ("blockdev-add", {"driver": "null-co", "node-name": "vs-repair-vda", "size": 8 * MiB}),
        ("block-dirty-bitmap-add", {"node": "vs-repair-vda", "name": "vs-repair-vda", "persistent": False,
                                    "granularity": 65536}),
        ("human-monitor-command", {"command-line": f'qemu-io vs-repair-vda "write -z {MiB} {MiB}"'}),
        ("human-monitor-command", {"command-line": f'qemu-io vs-repair-vda "write -z {6 * MiB} {MiB}"'}),
        ("block-dirty-bitmap-merge", {"node": "n0", "target": "vs-g3",
                                      "bitmaps": [{"node": "vs-repair-vda", "name": "vs-repair-vda"}]}),
        ("blockdev-del", {"node-name": "vs-repair-vda"}),
    ]


def test_nothing_to_repair_sends_nothing_more(tmp_path: Path) -> None:
    for repair in ({}, None, {"vda": []}, {"vda": [[0, 0]]}):
        qmp = scripted()
        assert asyncio.run(replicator(tmp_path, qmp, repair).reconcile()) == 3
        assert repair_commands(qmp) == [], repair
