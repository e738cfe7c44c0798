"""The primary's freeze/thaw hooks around the cut, at the QMP boundary (fake QMP, fake peer).

``before_cut`` runs right before the cut's ``transaction`` and ``after_cut``
right after it; ``after_cut`` runs whenever ``before_cut`` was called, also
when the transaction or the hook itself failed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from plugin.domain import DiskSpec
from plugin.errors import PluginError
from plugin.replication.primary import CutRefusedError, CycleError, DomainReplicator
from plugin.state import Store
from tests.fakes.fake_qmp import FakeQmp, job_event

TXN_ERROR = {"error": {"class": "GenericError", "desc": "Bitmap 'vs-g1' already exists"}}


class FakePeer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def call(self, op: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        self.calls.append(op)
        if op == "info":
            return {"last_marker": 0}
        if op == "open_cycle":
            return {"host": "192.0.2.2", "port": 10809, "exports": {"vda": "vs-1-vda"}}
        if op == "commit_cycle":
            return {"seq": body["seq"]}
        return None


def replicator(tmp_path: Path, qmp: FakeQmp, peer: FakePeer) -> DomainReplicator:
    return DomainReplicator(store=Store(str(tmp_path / "s.db")), peer=peer, qmp=qmp,  # type: ignore[arg-type]
                            uuid="u", domain="web01", disks=[DiskSpec("vda", "/x", "qcow2", 1 << 20, "n0")],
                            scratch=str(tmp_path), shipper=qmp,
                            cycle_timeout=5, stall_after=5)


def script_first_cycle(qmp: FakeQmp, transaction: Any = None, events: list[Any] | None = None) -> None:
    """The commands of a first (full) cycle of one disk, up to and around the cut."""
    qmp.on("query-named-block-nodes", {"return": []})
    qmp.on("blockdev-add")
    qmp.on("transaction", transaction, events_before=events or [])
    qmp.on("query-jobs", {"return": []})
    qmp.on("blockdev-del")


def hooks(qmp: FakeQmp, *, freeze_error: Exception | None = None,
          thaw_error: Exception | None = None) -> tuple[Any, Any]:
    """before/after hooks that log themselves into the QMP command stream."""
    async def before_cut() -> None:
        qmp.sent.append(("<freeze>", {}))
        if freeze_error is not None:
            raise freeze_error

    async def after_cut() -> None:
        qmp.sent.append(("<thaw>", {}))
        if thaw_error is not None:
            raise thaw_error

    return before_cut, after_cut


def around_cut(qmp: FakeQmp) -> list[str]:
    cmds = qmp.commands()
    first = next(i for i, c in enumerate(cmds) if c in ("<freeze>", "transaction"))
    return cmds[first:first + 3]


def test_thaw_follows_a_failed_transaction(tmp_path: Path) -> None:
    qmp, peer = FakeQmp(), FakePeer()
    script_first_cycle(qmp, TXN_ERROR)
    before, after = hooks(qmp)
    rep = replicator(tmp_path, qmp, peer)
    with pytest.raises(CycleError, match="already exists") as info:
        asyncio.run(rep.cycle(label="x", before_cut=before, after_cut=after))
    assert not isinstance(info.value, CutRefusedError)
    assert around_cut(qmp) == ["<freeze>", "transaction", "<thaw>"]
    assert qmp.commands().count("<thaw>") == 1
    assert peer.calls[-1] == "abort_cycle"   # the segment is dropped: no marker


def test_refused_freeze_cuts_nothing_and_still_thaws(tmp_path: Path) -> None:
    qmp, peer = FakeQmp(), FakePeer()
    script_first_cycle(qmp)
    refusal = PluginError("web01: no guest agent answered (QEMU guest agent is not configured)")
    before, after = hooks(qmp, freeze_error=refusal)
    rep = replicator(tmp_path, qmp, peer)
    with pytest.raises(CutRefusedError) as info:
        asyncio.run(rep.cycle(before_cut=before, after_cut=after))
    assert info.value.__cause__ is refusal
    assert "transaction" not in qmp.commands()
    assert around_cut(qmp)[:2] == ["<freeze>", "<thaw>"]
    assert peer.calls[-1] == "abort_cycle"
    assert "commit_cycle" not in peer.calls


def test_freeze_and_thaw_bracket_a_successful_cut(tmp_path: Path) -> None:
    """The thaw comes right after the transaction, before the data is copied; a thaw
    error is logged, not fatal: the cut stands and its marker is committed."""
    qmp, peer = FakeQmp(), FakePeer()
    job = "vs-cyc1-vda"
    script_first_cycle(qmp, events=[job_event(job, "created"), job_event(job, "running"),
                                    job_event(job, "concluded")])
    qmp.on("query-jobs", {"return": [{"id": job, "type": "backup", "status": "concluded",
                                      "current-progress": 1, "total-progress": 1}]})
    qmp.on("job-dismiss")
    before, after = hooks(qmp, thaw_error=PluginError("thaw failed"))
    rep = replicator(tmp_path, qmp, peer)
    stats = asyncio.run(rep.cycle(before_cut=before, after_cut=after))
    assert stats.seq == 1
    assert around_cut(qmp) == ["<freeze>", "transaction", "<thaw>"]
    assert peer.calls[-1] == "commit_cycle"


def test_no_hooks_no_freeze(tmp_path: Path) -> None:
    qmp, peer = FakeQmp(), FakePeer()
    script_first_cycle(qmp, TXN_ERROR)
    with pytest.raises(CycleError):
        asyncio.run(replicator(tmp_path, qmp, peer).cycle())
    assert "<freeze>" not in qmp.commands() and "<thaw>" not in qmp.commands()
