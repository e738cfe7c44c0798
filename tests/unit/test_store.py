"""plugin.state.Store: WAL and FULL sync, round trips, audited state changes, durable markers."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin.domain import Marker, Pair, PairState, Protection, Role
from plugin.state import Store

UUID = "0f6b2d1e-6a4c-4d55-9a53-2b8f7a1c9e01"
OTHER = "7d3f0c9a-1b2e-4c5d-8e9f-0a1b2c3d4e5f"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[str]:
    """On tmpfs when there is one (every write fsyncs: milliseconds on a busy disk)."""
    if not os.access("/dev/shm", os.W_OK):
        yield str(tmp_path / "state" / "state.db")
        return
    root = tempfile.mkdtemp(prefix="vs-unit-", dir="/dev/shm")
    try:
        yield os.path.join(root, "state", "state.db")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def store(db_path: str) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


def pair_events(store: Store, uuid: str = UUID) -> list[tuple[str, str | None, str, str]]:
    """The audited pair-state changes, oldest first: (target, old, new, reason)."""
    rows = [r for r in reversed(store.audit_log(uuid, limit=1000)) if r["event"] == "pair-state"]
    return [(r["detail"]["target"], r["detail"]["old"], r["detail"]["new"], r["detail"]["reason"]) for r in rows]


# -- the database itself --------------------------------------------------------

def test_wal_and_full_sync(store: Store, db_path: str) -> None:
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    # WAL is a property of the file: every later connection gets it too.
    other = sqlite3.connect(db_path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


def test_private_file_and_dir(store: Store, db_path: str) -> None:
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(db_path)).st_mode) == 0o700


def test_reopen_keeps_schema_and_rows(db_path: str) -> None:
    s = Store(db_path)
    s.add_protection(UUID, "primary", "web01", Protection(peer="dr1"))
    s.close()
    s = Store(db_path)  # CREATE TABLE IF NOT EXISTS: a restart changes nothing
    try:
        assert [r["domain"] for r in s.protections("primary")] == ["web01"]
    finally:
        s.close()


def test_transaction_rolls_back_on_error(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction() as db:
        db.execute("INSERT INTO audit (time, event) VALUES (0, 'x')")
        raise RuntimeError("boom")
    assert store.audit_log() == []


# -- protections ------------------------------------------------------------------

def test_protection_round_trip(store: Store) -> None:
    store.add_protection(UUID, "primary", "web01", Protection(peer="dr1", segment="gold", rpo=60, mode="async"))
    store.add_protection(UUID, "secondary", "web01", Protection(peer="pri"))
    row = store.protection(UUID, "primary")
    assert row is not None
    assert (row["domain"], row["peer"], row["segment"], row["rpo"], row["mode"], row["suspended"],
            row["committed_seq"]) == ("web01", "dr1", "gold", 60, "async", 0, 0)
    store.set_protection(UUID, "primary", suspended=1, committed_seq=7)
    row = store.protection(UUID, "primary")
    assert row is not None and (row["suspended"], row["committed_seq"]) == (1, 7)
    assert [r["role"] for r in store.protections("secondary")] == ["secondary"]
    assert store.protection(OTHER, "primary") is None


def test_protection_twice_is_refused(store: Store) -> None:
    store.add_protection(UUID, "primary", "web01", Protection(peer="dr1"))
    with pytest.raises(sqlite3.IntegrityError):
        store.add_protection(UUID, "primary", "web01", Protection(peer="dr2"))
    row = store.protection(UUID, "primary")
    assert row is not None and row["peer"] == "dr1"
    assert [r["event"] for r in store.audit_log(UUID)] == ["protect"]  # the refused one left no audit


def test_set_protection_refuses_unknown_columns(store: Store) -> None:
    store.add_protection(UUID, "primary", "web01", Protection(peer="dr1"))
    for values in ({"peer": "x"}, {}, {"domain_uuid": OTHER}, {"generation": 1}, {"generation = 0; DROP TABLE pairs; --": 1}):
        with pytest.raises(ValueError):
            store.set_protection(UUID, "primary", **values)


def test_bad_role_refused(store: Store) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        store.add_protection(UUID, "tertiary", "web01", Protection(peer="dr1"))


def test_every_role_is_one_the_schema_allows(store: Store) -> None:
    """A Role the CHECK constraint does not know would need a schema step first."""
    for role in Role:
        store.add_protection(UUID, role, "web01", Protection(peer="dr1"))
        row = store.protection(UUID, role)
        assert row is not None and Role(row["role"]) is role
        assert [r["domain_uuid"] for r in store.protections(role)] == [UUID]
    assert [Role(r["detail"]["role"]) for r in reversed(store.audit_log(UUID))] == list(Role)


def test_remove_protection_deletes_pairs_and_audits(store: Store) -> None:
    store.add_protection(UUID, "primary", "web01", Protection(peer="dr1"))
    for target in ("vda", "vdb"):
        store.upsert_pair(UUID, "primary", "web01", target, "dr1", 1 << 20, PairState.INITIAL_COPY)
    store.set_pair_state(UUID, "primary", PairState.ACTIVE, target="vda")
    store.remove_protection(UUID, "primary")
    assert store.protection(UUID, "primary") is None
    assert store.pairs("primary") == []
    assert {p.state for p in store.pairs("primary", include_deleted=True)} == {PairState.DELETED}
    assert pair_events(store)[-2:] == [("vda", "active", "deleted", ""), ("vdb", "initial-copy", "deleted", "")]
    assert store.audit_log(UUID)[0]["event"] == "unprotect"


# -- pairs and their state --------------------------------------------------------

def test_pair_round_trip(store: Store) -> None:
    pid = store.upsert_pair(UUID, "primary", "web01", "vda", "dr1", 16 << 20, PairState.INITIAL_COPY)
    assert store.pair_id(UUID, "primary", "vda") == pid
    store.set_pair_progress(UUID, "primary", "vda", 4 << 20, 16 << 20)
    assert store.pairs("primary") == [Pair(UUID, "web01", "vda", "dr1", PairState.INITIAL_COPY, "", 16 << 20,
                                           4 << 20, 16 << 20, 0)]
    # Upsert keeps the id (export and node names derive from it) and takes the new values.
    assert store.upsert_pair(UUID, "primary", "web02", "vda", "dr2", 32 << 20, PairState.INITIAL_COPY) == pid
    (pair,) = store.pairs("primary", UUID)
    assert (pair.domain, pair.peer, pair.size) == ("web02", "dr2", 32 << 20)
    with pytest.raises(KeyError):
        store.pair_id(UUID, "primary", "vdz")


def test_pairs_are_per_role_and_domain(store: Store) -> None:
    store.upsert_pair(UUID, "primary", "web01", "vda", "dr1", 1, PairState.ACTIVE)
    store.upsert_pair(UUID, "secondary", "web01", "vda", "pri", 1, PairState.ACTIVE)
    store.upsert_pair(OTHER, "primary", "db01", "vda", "dr1", 1, PairState.ACTIVE)
    assert [(p.domain, p.target) for p in store.pairs("primary")] == [("db01", "vda"), ("web01", "vda")]
    assert [p.domain for p in store.pairs("primary", UUID)] == ["web01"]
    assert [p.peer for p in store.pairs("secondary")] == ["pri"]


def test_state_transitions_are_audited(store: Store) -> None:
    store.upsert_pair(UUID, "primary", "web01", "vda", "dr1", 1, PairState.INITIAL_COPY)
    store.upsert_pair(UUID, "primary", "web01", "vdb", "dr1", 1, PairState.INITIAL_COPY)
    store.set_pair_state(UUID, "primary", PairState.ACTIVE)
    store.set_pair_state(UUID, "primary", PairState.ACTIVE)                       # no change: no entry
    store.set_pair_state(UUID, "primary", PairState.ERROR, "peer unreachable; retrying in 1s")
    store.set_pair_state(UUID, "primary", PairState.ERROR, "peer unreachable; retrying in 1s")
    store.set_pair_state(UUID, "primary", PairState.ERROR, "peer unreachable; retrying in 2s")  # new reason
    store.set_pair_state(UUID, "primary", PairState.SUSPENDED, target="vdb")
    store.set_pair_state(UUID, "primary", PairState.ACTIVE, target="vda")
    assert pair_events(store) == [
        ("vda", None, "initial-copy", ""),
        ("vdb", None, "initial-copy", ""),
        ("vda", "initial-copy", "active", ""),
        ("vdb", "initial-copy", "active", ""),
        ("vda", "active", "error", "peer unreachable; retrying in 1s"),
        ("vdb", "active", "error", "peer unreachable; retrying in 1s"),
        ("vda", "error", "error", "peer unreachable; retrying in 2s"),
        ("vdb", "error", "error", "peer unreachable; retrying in 2s"),
        ("vdb", "error", "suspended", ""),
        ("vda", "error", "active", ""),
    ]
    states = {p.target: (p.state, p.reason) for p in store.pairs("primary")}
    assert states == {"vda": (PairState.ACTIVE, ""), "vdb": (PairState.SUSPENDED, "")}


def test_reprotect_after_delete_is_audited(store: Store) -> None:
    store.add_protection(UUID, "primary", "web01", Protection(peer="dr1"))
    store.upsert_pair(UUID, "primary", "web01", "vda", "dr1", 1, PairState.INITIAL_COPY)
    store.set_pair_state(UUID, "primary", PairState.ERROR, "stalled")
    store.remove_protection(UUID, "primary")
    store.upsert_pair(UUID, "primary", "web01", "vda", "dr1", 1, PairState.INITIAL_COPY)
    assert pair_events(store)[-2:] == [("vda", "error", "deleted", ""), ("vda", "deleted", "initial-copy", "")]
    (pair,) = store.pairs("primary")
    assert (pair.state, pair.reason) == (PairState.INITIAL_COPY, "")   # the old reason is gone


def test_deleted_pairs_stay_deleted(store: Store) -> None:
    store.upsert_pair(UUID, "primary", "web01", "vda", "dr1", 1, PairState.ACTIVE)
    store.remove_protection(UUID, "primary")
    before = len(pair_events(store))
    store.set_pair_state(UUID, "primary", PairState.ERROR, "late failure of a stopped supervisor")
    assert len(pair_events(store)) == before
    assert store.pairs("primary", include_deleted=True)[0].state is PairState.DELETED


def test_audit_detail_is_json(store: Store) -> None:
    store.audit("custom", UUID, path="/x", n=3, when=object())
    (entry,) = store.audit_log(UUID)
    assert entry["event"] == "custom" and entry["detail"]["n"] == 3 and entry["detail"]["path"] == "/x"
    assert json.dumps(entry["detail"])


# -- markers ------------------------------------------------------------------------

def marker(seq: int, uuid: str = UUID, **kw: object) -> Marker:
    return Marker(seq, uuid, 1_700_000_000.0 + seq, ("vda", "vdb"), {"vda": seq * 65536, "vdb": 0}, **kw)  # type: ignore[arg-type]


def test_marker_round_trip(store: Store) -> None:
    store.upsert_pair(UUID, "secondary", "web01", "vda", "pri", 1, PairState.INITIAL_COPY)
    store.commit_marker(marker(1))
    store.commit_marker(marker(2, label="before upgrade", apply=False))
    store.commit_marker(marker(1, uuid=OTHER))
    assert store.markers(UUID) == [marker(1), marker(2, label="before upgrade", apply=False)]
    assert store.last_marker(UUID) == marker(2, label="before upgrade", apply=False)
    assert store.last_marker("nope") is None
    assert store.pairs("secondary")[0].last_marker == 2
    assert [e["detail"]["seq"] for e in store.audit_log(UUID) if e["event"] == "marker"] == [2, 1]
    store.set_marker_applied(UUID, 1)
    assert [m.applied for m in store.markers(UUID)] == [True, False]
    store.drop_markers(UUID)
    assert store.markers(UUID) == [] and store.markers(OTHER) == [marker(1, uuid=OTHER)]


def test_marker_commit_is_all_or_nothing(store: Store) -> None:
    store.upsert_pair(UUID, "secondary", "web01", "vda", "pri", 1, PairState.ACTIVE)
    store.commit_marker(marker(1))
    audit_before = store.audit_log(UUID)
    with pytest.raises(sqlite3.IntegrityError):
        store.commit_marker(marker(1, label="replayed"))
    assert store.markers(UUID) == [marker(1)]
    assert store.audit_log(UUID) == audit_before


def test_marker_commit_durable_across_reopen(db_path: str) -> None:
    s = Store(db_path)
    s.upsert_pair(UUID, "secondary", "web01", "vda", "pri", 1, PairState.ACTIVE)
    s.commit_marker(marker(1))
    s.close()
    s = Store(db_path)
    try:
        assert s.markers(UUID) == [marker(1)]
        assert s.pairs("secondary")[0].last_marker == 1
    finally:
        s.close()


def test_marker_commit_durable_when_the_process_dies(db_path: str) -> None:
    """The agent is killed right after commit_marker returns (no close, no checkpoint):
    the marker is in the WAL and a new process sees it."""
    code = (
        "import os, sys\n"
        "from plugin.domain import Marker, PairState\n"
        "from plugin.state import Store\n"
        f"s = Store({db_path!r})\n"
        f"s.upsert_pair({UUID!r}, 'secondary', 'web01', 'vda', 'pri', 1, PairState.ACTIVE)\n"
        f"s.commit_marker(Marker(7, {UUID!r}, 1.5, ('vda',), {{'vda': 4096}}, 'k'))\n"
        "sys.stdout.write('committed'); sys.stdout.flush()\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=30,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == -9 and proc.stdout == "committed", proc.stderr
    assert os.path.getsize(db_path + "-wal") > 0  # not checkpointed: recovery comes from the WAL
    s = Store(db_path)
    try:
        assert s.markers(UUID) == [Marker(7, UUID, 1.5, ("vda",), {"vda": 4096}, "k")]
        assert s.pairs("secondary")[0].last_marker == 7
    finally:
        s.close()


# -- cycles ---------------------------------------------------------------------------

def test_cycles_history(store: Store) -> None:
    first = store.start_cycle(UUID, 1, "full")
    store.finish_cycle(first, 1 << 20)
    second = store.start_cycle(UUID, 2, "incremental")
    store.finish_cycle(second, 0, error="peer unreachable")
    rows = store.cycles(UUID)
    assert [(r["seq"], r["kind"], r["bytes"], r["error"]) for r in rows] == [
        (2, "incremental", 0, "peer unreachable"), (1, "full", 1 << 20, None)]
    assert all(r["finished"] >= r["started"] for r in rows)
    assert store.cycles(OTHER) == []
