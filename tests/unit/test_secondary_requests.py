"""The secondary refuses bad or stale peer requests, and a refusal creates nothing.

The secondary is real (:class:`plugin.replication.secondary.Secondary` over a real
sqlite store in ``tmp_path``); its qemu-storage-daemon is a scripted
:class:`tests.fakes.fake_qmp.FakeQmp` and ``qemu-img`` is replaced by a stand-in
that only creates the files it would create, so the unit tier needs no QEMU.
After every refusal the storage tree, the QMP commands sent and the state rows
are compared with what they were before: a refused request leaves no trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import math
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin.config import Config
from plugin.daemon import Agent
from plugin.errors import PluginError, StateConflictError
from plugin.replication import secondary as secondary_mod
from plugin.replication.secondary import PeerRequestError, Secondary
from plugin.state import Store
from tests.fakes.fake_qmp import FakeQmp

UUID = "0f6b2d1e-6a4c-4d55-9a53-2b8f7a1c9e01"
OTHER = "7d3f0c9a-1b2e-4c5d-8e9f-0a1b2c3d4e5f"
MiB = 1 << 20
DISKS = [{"target": "vda", "size": 16 * MiB}, {"target": "vdb", "size": 8 * MiB}]
PROTECTION = {"segment": "default", "rpo": 300, "mode": "async"}

BAD_UUIDS = ["", "../x", "not-a-uuid", "..", f"{UUID}/../x", f"../{UUID}", "0f6b2d1e", UUID + "0", None, 7]
BAD_TARGETS = ["../x", "vda/..", "..", ".", "", "vd a", "vda\x00", "vd\u00e4", "a" * 17, "vda/", "/vda", "vda\n",
               1, None, ["vda"]]


class Env:
    """A secondary with a fake QEMU, and what a refusal must leave unchanged."""

    def __init__(self, tmp_path: Path) -> None:
        self.storage = tmp_path / "replicas"
        self.storage.mkdir()
        self.cfg = Config(name="sec", listen_host="127.0.0.1", listen_port=8441, state_dir=str(tmp_path / "state"),
                          storage=str(self.storage))
        self.store = Store(self.cfg.db_path)
        self.qmp = FakeQmp()
        for command in ("blockdev-add", "blockdev-del", "block-export-add"):
            self.qmp.on(command)
        self.qmp.on("block-export-del", self._export_deleted)
        self.sec = Secondary(self.cfg, self.store, self.qmp)
        self.img: list[tuple[str, ...]] = []

    def _export_deleted(self, args: Any) -> dict[str, Any]:
        self.qmp.emit("BLOCK_EXPORT_DELETED", id=args["id"])
        return {"return": {}}

    async def fake_qemu_img(self, *argv: str) -> None:
        """What qemu-img would leave on disk: create makes the (empty) image, whose chunk
        hashes the secondary records; commit/rebase change nothing we check."""
        self.img.append(argv)
        if argv[:2] == ("qemu-img", "create"):
            path = argv[-2]
            assert os.path.isdir(os.path.dirname(path)), f"qemu-img create into a missing dir: {path}"
            subprocess.run(argv, check=True)

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.storage)) for p in self.storage.rglob("*"))

    def rows(self) -> dict[str, list[tuple[Any, ...]]]:
        db = sqlite3.connect(self.cfg.db_path)
        try:
            return {
                "protections": db.execute("SELECT domain_uuid, role, domain, peer FROM protections").fetchall(),
                "pairs": db.execute("SELECT domain_uuid, target, state, size FROM pairs ORDER BY id").fetchall(),
                "markers": db.execute("SELECT domain_uuid, seq FROM markers ORDER BY seq").fetchall(),
            }
        finally:
            db.close()

    def snapshot(self) -> tuple[Any, ...]:
        return (self.files(), len(self.qmp.sent), len(self.img), self.rows(), dict(self.sec._open))

    def refuses(self, coro: Coroutine[Any, Any, Any], error: type[PluginError] = PeerRequestError,
                match: str | None = None) -> str:
        """Run ``coro``: it must raise ``error`` and change nothing."""
        before = self.snapshot()
        with pytest.raises(error, match=match) as info:
            asyncio.run(coro)
        assert self.snapshot() == before, "a refused request left a trace"
        message = str(info.value)
        assert "\n" not in message and len(message) < 300, message
        return message

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run(coro)

    # -- steps of a good exchange ----------------------------------------------

    def prepare(self, disks: list[dict[str, Any]] = DISKS) -> Any:
        return self.run(self.sec.prepare(UUID, "web01", "pri", disks, PROTECTION))

    def open(self, seq: int, kind: str, targets: list[str] | None = None) -> Any:
        return self.run(self.sec.open_cycle(UUID, seq, kind, targets or ["vda", "vdb"]))

    def commit(self, seq: int, nbytes: dict[str, int] | None = None) -> Any:
        return self.run(self.sec.commit_cycle(UUID, seq, 1000.0 + seq, nbytes or {"vda": 65536, "vdb": 0}))


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs directory when there is one: the store fsyncs every write (synchronous=FULL),
    which costs milliseconds on a busy disk and nothing on tmpfs."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="vs-unit-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(fast_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    e = Env(fast_dir)
    monkeypatch.setattr(secondary_mod, "run_tool", e.fake_qemu_img)
    yield e
    e.store.close()


@pytest.fixture
def prepared(env: Env) -> Env:
    env.prepare()
    assert sorted(os.listdir(env.storage / UUID)) and env.rows()["pairs"]
    return env


@pytest.fixture
def one_marker(prepared: Env) -> Env:
    prepared.open(1, "full")
    prepared.commit(1)
    assert prepared.rows()["markers"] == [(UUID, 1)]
    return prepared


# -- the domain uuid names a directory: only a canonical uuid is taken ------------

def operations(uuid: Any) -> list[Callable[[Secondary], Coroutine[Any, Any, Any]]]:
    return [
        lambda s: s.prepare(uuid, "web01", "pri", DISKS, PROTECTION),
        lambda s: s.open_cycle(uuid, 1, "full", ["vda", "vdb"]),
        lambda s: s.commit_cycle(uuid, 1, 1.0, {"vda": 0, "vdb": 0}),
        lambda s: s.abort_cycle(uuid, 1),
        lambda s: s.remove(uuid, False),
    ]


@pytest.mark.parametrize("uuid", BAD_UUIDS, ids=repr)
def test_bad_uuid_refused_by_every_operation(env: Env, uuid: Any) -> None:
    for op in operations(uuid):
        assert "not a domain uuid" in env.refuses(op(env.sec))
    with pytest.raises(PeerRequestError):
        env.sec.info(uuid)


def test_bad_uuid_cannot_touch_an_existing_replica(prepared: Env) -> None:
    # "remove" with a uuid that resolves outside storage/<uuid> must not delete anything.
    for uuid in (f"{UUID}/..", "..", f"../replicas/{UUID}"):
        prepared.refuses(prepared.sec.remove(uuid, False))
    assert (prepared.storage / UUID).is_dir()


def test_uuid_spellings_are_one_domain(prepared: Env) -> None:
    """UUID() also takes upper case, braces and urn: all name the same directory."""
    before = prepared.files()
    for spelling in (UUID.upper(), "{" + UUID + "}", "urn:uuid:" + UUID, UUID.replace("-", "")):
        prepared.run(prepared.sec.prepare(spelling, "web01", "pri", DISKS, PROTECTION))
    assert prepared.files() == before
    assert [r[0] for r in prepared.rows()["protections"]] == [UUID]


# -- prepare: targets, sizes, disk lists, protection ------------------------------

@pytest.mark.parametrize("target", BAD_TARGETS, ids=repr)
def test_prepare_bad_target(env: Env, target: Any) -> None:
    assert "not a disk target" in env.refuses(
        env.sec.prepare(UUID, "web01", "pri", [{"target": target, "size": MiB}], PROTECTION))
    # A good disk before the bad one is not created either: all or nothing.
    env.refuses(env.sec.prepare(UUID, "web01", "pri", [DISKS[0], {"target": target, "size": MiB}], PROTECTION))
    assert env.files() == []


@pytest.mark.parametrize("size", [0, -1, True, False, "1G", 1 << 51, 1.5, None, float("nan")], ids=repr)
def test_prepare_bad_size(env: Env, size: Any) -> None:
    assert "bad size" in env.refuses(
        env.sec.prepare(UUID, "web01", "pri", [DISKS[0], {"target": "vdb", "size": size}], PROTECTION))


@pytest.mark.parametrize("disks", [[], [DISKS[0], DISKS[0]], [DISKS[0], {"target": "vda", "size": MiB}]], ids=repr)
def test_prepare_empty_or_repeated_disks(env: Env, disks: list[dict[str, Any]]) -> None:
    env.refuses(env.sec.prepare(UUID, "web01", "pri", disks, PROTECTION))


@pytest.mark.parametrize("protection", [{"rpo": "x"}, {"rpo": 0}, {"rpo": 10**9}, {"mode": "bogus"},
                                        {"rpo": None}, {"rpo": [1]}], ids=repr)
def test_prepare_bad_protection_creates_nothing(env: Env, protection: dict[str, Any]) -> None:
    assert "protection" in env.refuses(env.sec.prepare(UUID, "web01", "pri", DISKS, protection))


def test_prepare_again_is_idempotent(prepared: Env) -> None:
    before = prepared.files()
    assert prepared.prepare() == {"last_marker": 0}
    assert prepared.files() == before


# -- open_cycle ---------------------------------------------------------------------

def test_open_cycle_of_an_unknown_domain(env: Env) -> None:
    env.refuses(env.sec.open_cycle(OTHER, 1, "full", ["vda"]), StateConflictError, "not replicated")


@pytest.mark.parametrize("seq", [0, -1, 2, 1000], ids=repr)
def test_open_cycle_out_of_order(prepared: Env, seq: int) -> None:
    assert "out of order" in prepared.refuses(prepared.sec.open_cycle(UUID, seq, "full", ["vda", "vdb"]))


@pytest.mark.parametrize("kind", ["diff", "", "FULL", "full "], ids=repr)
def test_open_cycle_unknown_kind(prepared: Env, kind: str) -> None:
    assert "kind" in prepared.refuses(prepared.sec.open_cycle(UUID, 1, kind, ["vda", "vdb"]))


@pytest.mark.parametrize("targets", [["vdz"], ["vda", "vdb", "vdc"], ["../x"], ["vda/.."], ["vda", "../vdb"], [],
                                     ["vda", "vda"], ["vda", "vdb", "vda"]], ids=repr)
def test_open_cycle_unknown_bad_or_repeated_disks(prepared: Env, targets: list[str]) -> None:
    prepared.refuses(prepared.sec.open_cycle(UUID, 1, "full", targets))


def test_open_cycle_must_cover_every_disk(prepared: Env) -> None:
    """A marker is a cut across all the domain's disks: a cycle for a subset would
    commit a marker whose other disks were never copied."""
    prepared.refuses(prepared.sec.open_cycle(UUID, 1, "full", ["vda"]))


def test_incremental_without_a_previous_marker(prepared: Env) -> None:
    assert "previous marker" in prepared.refuses(prepared.sec.open_cycle(UUID, 1, "incremental", ["vda", "vdb"]))


def test_open_cycle_for_an_old_seq_after_a_marker(one_marker: Env) -> None:
    for seq in (1, 0, 3):
        one_marker.refuses(one_marker.sec.open_cycle(UUID, seq, "incremental", ["vda", "vdb"]))


# -- commit_cycle -------------------------------------------------------------------

def test_commit_without_an_open_cycle(prepared: Env) -> None:
    assert "no open cycle" in prepared.refuses(prepared.sec.commit_cycle(UUID, 1, 1.0, {"vda": 0, "vdb": 0}))


def test_commit_of_an_unknown_domain(env: Env) -> None:
    env.refuses(env.sec.commit_cycle(OTHER, 1, 1.0, {"vda": 0}))


def test_replayed_commit_of_a_committed_seq(one_marker: Env) -> None:
    assert "no open cycle" in one_marker.refuses(one_marker.sec.commit_cycle(UUID, 1, 1.0, {"vda": 0, "vdb": 0}))


def test_replayed_commit_while_the_next_cycle_is_open(one_marker: Env) -> None:
    """The replay neither records a marker nor disturbs the open cycle 2."""
    one_marker.open(2, "incremental")
    partials = [f for f in one_marker.files() if f.endswith(".partial")]
    assert len(partials) == 2
    one_marker.refuses(one_marker.sec.commit_cycle(UUID, 1, 1.0, {"vda": 0, "vdb": 0}))
    one_marker.refuses(one_marker.sec.open_cycle(UUID, 1, "full", ["vda", "vdb"]))
    one_marker.refuses(one_marker.sec.commit_cycle(UUID, 3, 1.0, {"vda": 0, "vdb": 0}))
    assert [f for f in one_marker.files() if f.endswith(".partial")] == partials
    one_marker.commit(2)
    assert one_marker.rows()["markers"] == [(UUID, 1), (UUID, 2)]
    assert not [f for f in one_marker.files() if f.endswith(".partial")]


@pytest.mark.parametrize("nbytes", [{"vda": 0}, {"vda": 0, "vdb": 0, "vdc": 0}, {"vda": 0, "../x": 0},
                                    {"vda": -1, "vdb": 0}, {"vda": True, "vdb": 0}, {"vda": 1.5, "vdb": 0},
                                    {"vda": "1", "vdb": 0}], ids=repr)
def test_commit_with_bad_byte_counts(one_marker: Env, nbytes: dict[str, Any]) -> None:
    one_marker.open(2, "incremental")
    one_marker.refuses(one_marker.sec.commit_cycle(UUID, 2, 2000.0, nbytes))
    one_marker.commit(2)  # the cycle survived the bad commit


@pytest.mark.parametrize("cut_time", [math.nan, math.inf, -math.inf, -1.0], ids=repr)
def test_commit_with_bad_cut_time(one_marker: Env, cut_time: float) -> None:
    one_marker.open(2, "incremental")
    one_marker.refuses(one_marker.sec.commit_cycle(UUID, 2, cut_time, {"vda": 0, "vdb": 0}))


@pytest.mark.parametrize("label", ["x" * 129, "a\nb", "\x1b[2J"], ids=repr)
def test_commit_with_bad_label(one_marker: Env, label: str) -> None:
    one_marker.open(2, "incremental")
    one_marker.refuses(one_marker.sec.commit_cycle(UUID, 2, 2000.0, {"vda": 0, "vdb": 0}, label=label))


def test_abort_of_another_seq_keeps_the_open_cycle(one_marker: Env) -> None:
    one_marker.open(2, "incremental")
    before = one_marker.snapshot()
    one_marker.run(one_marker.sec.abort_cycle(UUID, 1))
    one_marker.run(one_marker.sec.abort_cycle(UUID, 3))
    assert one_marker.snapshot() == before
    one_marker.run(one_marker.sec.abort_cycle(UUID, 2))
    assert not [f for f in one_marker.files() if f.endswith(".partial")]


# -- the same requests as the peer API delivers them (daemon handlers) ------------

@pytest.fixture
def handlers(env: Env) -> dict[str, Any]:
    agent = Agent(env.cfg)
    agent.secondary = env.sec
    agent.store = env.store
    # As the peer API calls them: authenticated as "pri", the primary these bodies name.
    return {op: functools.partial(lambda h, body: h(body, "pri"), h) for op, h in agent._peer_handlers().items()}


@pytest.mark.parametrize("op, body", [
    ("prepare", {"uuid": UUID, "domain": "web01", "primary": "pri", "disks": ["vda"]}),
    ("prepare", {"uuid": UUID, "domain": "web01", "primary": "pri", "disks": "vda"}),
    ("prepare", {"uuid": UUID, "domain": "web01", "primary": "pri"}),
    ("prepare", {"uuid": UUID, "domain": 5, "primary": "pri", "disks": DISKS}),
    ("prepare", {"uuid": "../x", "domain": "web01", "primary": "pri", "disks": DISKS}),
    ("open_cycle", {"uuid": UUID, "seq": True, "kind": "full", "targets": ["vda", "vdb"]}),
    ("open_cycle", {"uuid": UUID, "seq": "1", "kind": "full", "targets": ["vda", "vdb"]}),
    ("open_cycle", {"uuid": UUID, "seq": 1, "kind": "full", "targets": "vda"}),
    ("open_cycle", {"uuid": UUID, "seq": 1, "kind": "full", "targets": [["vda"], "vdb"]}),
    ("commit_cycle", {"uuid": UUID, "seq": 1, "cut_time": 1.0, "bytes": {"vda": True, "vdb": 0}}),
    ("commit_cycle", {"uuid": UUID, "seq": 1, "cut_time": "now", "bytes": {"vda": 0, "vdb": 0}}),
    ("commit_cycle", {"uuid": UUID, "seq": 1, "cut_time": 1.0, "bytes": [0, 0]}),
    ("remove", {"uuid": "..", "keep_replica": False}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_peer_api_bodies(prepared: Env, handlers: dict[str, Any], op: str, body: dict[str, Any]) -> None:
    prepared.refuses(handlers[op](body), PluginError)


def test_peer_api_good_exchange(env: Env, handlers: dict[str, Any]) -> None:
    """The handlers pass good bodies through: the refusals above are not a broken path."""
    env.run(handlers["prepare"]({"uuid": UUID, "domain": "web01", "primary": "pri", "disks": DISKS,
                                 "protection": PROTECTION}))
    reply = env.run(handlers["open_cycle"]({"uuid": UUID, "seq": 1, "kind": "full", "targets": ["vda", "vdb"]}))
    assert sorted(reply["exports"]) == ["vda", "vdb"]
    env.run(handlers["commit_cycle"]({"uuid": UUID, "seq": 1, "cut_time": 5, "bytes": {"vda": 1, "vdb": 2}}))
    assert env.rows()["markers"] == [(UUID, 1)]
    env.run(handlers["remove"]({"uuid": UUID, "keep_replica": False}))
    assert env.files() == []


def test_segments_are_hashed_off_the_event_loop(one_marker: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sealing and checking hash whole segments (~0.1 s per 100 MiB): in a worker
    thread, so the agent's loop keeps serving other domains and peer calls."""
    threads: list[tuple[str, int]] = []

    def recording(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            threads.append((name, threading.get_ident()))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(secondary_mod.integrity, "file_chunk_digests",
                        recording("hash", secondary_mod.integrity.file_chunk_digests))
    monkeypatch.setattr(secondary_mod, "verify_segment", recording("verify", secondary_mod.verify_segment))
    one_marker.open(2, "incremental")
    one_marker.commit(2)
    assert one_marker.rows()["markers"] == [(UUID, 1), (UUID, 2)]
    assert {name for name, _ in threads} == {"hash", "verify"}
    assert all(ident != threading.get_ident() for _, ident in threads), threads


def test_scheduled_verify_runs_when_due_and_reports_damage(one_marker: Env) -> None:
    """``[journal] scrub_interval``: the first sight of a replica starts the clock;
    once that old, the scrub runs and its findings land in the report."""
    from plugin.replication import integrity

    sec = Secondary(dataclasses.replace(one_marker.cfg, scrub_interval=0.3), one_marker.store, one_marker.qmp)
    root = one_marker.storage / UUID
    with open(root / "vdb.base.sums", "r+b") as f:   # chunk 2's hash
        f.seek(integrity.HEADER_SIZE + 2 * 37 + 20)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))

    async def until_checked() -> dict[str, Any]:
        task = asyncio.create_task(sec.run_scrubs())
        try:
            for _ in range(200):
                await asyncio.sleep(0.05)
                report = integrity.load_report(str(root))
                if report and report.get("checked_at"):
                    return report
            raise AssertionError("no scheduled verify ran")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    report = one_marker.run(until_checked())
    assert report["findings"] == ["vdb.base.qcow2 chunk 2 (guest bytes 2097152..3145728): its hash record entry "
                                  "is damaged"]
    assert report["markers"] == {"1": "marker 1: " + report["findings"][0]}
    assert sec.info(UUID)["repair"] == {}   # worked out off the event loop, by info_async
    info = one_marker.run(sec.info_async(UUID))
    assert info["markers"][0]["damage"] == report["markers"]["1"]
    assert info["repair"] == {"vdb": [[2 * MiB, MiB]]}
