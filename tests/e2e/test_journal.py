"""The journal on the secondary: markers, hold, --no-apply, apply --until,
retention, restore of every retained marker, crashes at every durable step,
and damaged segments. Every claim is checked against the guest's write log.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin.errors import PluginError
from tests.lab import stamps
from tests.lab.agent import LabAgent
from tests.lab.fixtures import LabPair
from tests.lab.site import open_site, start_writing_guest, wait_for

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]

DISKS, BLOCKS = 2, 1024
GUEST = "db01"


@pytest.fixture
def site(lab_pair: LabPair) -> Iterator[dict[str, Any]]:
    guest = start_writing_guest(lab_pair.pri, GUEST, DISKS, BLOCKS, size="8M")
    with open_site(lab_pair, journal={"retain_markers": 3}) as s:
        s.domains.append(GUEST)
        yield {"pri": s.pri, "sec": s.sec, "hosts": lab_pair, "disk_dir": Path(guest.disks[0]).parent}


def check(paths: list[str]) -> int:
    result = stamps.check_images(paths, stamps.Oracle(DISKS, BLOCKS), force_share=True)
    assert result.ok, result.summary()
    return result.cut_seq


def replica_cut(sec: LabAgent) -> tuple[int, int]:
    """(applied marker, the guest sequence number the replica holds)."""
    info = sec.call("markers", domain=GUEST)
    views = info["replica"]
    return info["applied"], check([views[t] for t in sorted(views)])


def restore_cut(sec: LabAgent, seq: int, tmp: Path) -> int:
    dest = tmp / f"restore-{seq}-{time.monotonic_ns()}"
    result = sec.call("restore", domain=GUEST, marker=seq, to=str(dest))
    return check([result["disks"][t] for t in sorted(result["disks"])])


def test_hold_no_apply_until_retention_and_restore(site: dict[str, Any], tmp_path: Path) -> None:
    pri, sec = site["pri"], site["sec"]
    pri.call("protect", domain=GUEST, to="sec", rpo=3600, wait=True)
    cuts: dict[int, int] = {}  # marker -> guest sequence number at that marker

    def mark(**kw: Any) -> int:
        time.sleep(0.3)
        seq = pri.call("mark", domain=GUEST, **kw)["seq"]
        cuts[seq] = restore_cut(sec, seq, tmp_path)
        return seq

    m2 = mark(label="a")
    assert replica_cut(sec) == (m2, cuts[m2])

    # hold: the replica stays while the journal grows
    sec.call("hold", domain=GUEST)
    m3, m4 = mark(), mark()
    assert replica_cut(sec) == (m2, cuts[m2])
    assert cuts[m2] < cuts[m3] < cuts[m4]

    # release applies what is allowed; a --no-apply marker stops it there
    m5 = mark(no_apply=True)
    m6 = mark()
    sec.call("release", domain=GUEST)
    assert replica_cut(sec) == (m4, cuts[m4])
    info = sec.call("markers", domain=GUEST)
    assert [m["applied"] for m in info["markers"] if m["seq"] >= m4] == [True, False, False]

    # apply --until moves it exactly there, past the --no-apply marker
    with pytest.raises(PluginError, match="already at marker"):
        sec.call("apply", domain=GUEST, until=m2)
    sec.call("apply", domain=GUEST, until=m5)
    assert replica_cut(sec) == (m5, cuts[m5])
    sec.call("apply", domain=GUEST, until=m6)
    assert replica_cut(sec) == (m6, cuts[m6])

    # retention: three applied markers (the replica's own included) stay
    # restorable; each retained marker still restores to exactly its cut
    info = sec.call("markers", domain=GUEST)
    retained = [m["seq"] for m in info["markers"]]
    assert retained == list(range(m6 - 2, m6 + 1)), retained
    for seq in retained:
        assert restore_cut(sec, seq, tmp_path) == cuts[seq]
    with pytest.raises(PluginError, match="not retained"):
        sec.call("restore", domain=GUEST, marker=m2, to=str(tmp_path / "gone"))
    # the primary sees the same journal
    assert [m["seq"] for m in pri.call("markers", domain=GUEST)["markers"]] == retained


FAULT_POINTS = ["seal-before-marker", "marker-before-reflect", "apply-after-pointer", "fold-after-intent",
                "fold-after-commit", "fold-after-link"]


def test_secondary_killed_mid_step_recovers_to_a_marker(site: dict[str, Any], tmp_path: Path) -> None:
    """SIGKILL at each durable step of sealing, committing, applying and
    folding: after restart the replica equals a marker and the journal goes on."""
    pri, sec = site["pri"], site["sec"]
    pri.call("protect", domain=GUEST, to="sec", rpo=3600, wait=True)
    for _ in range(3):  # enough applied markers that every next one folds
        pri.call("mark", domain=GUEST)
    for point in FAULT_POINTS:
        before = sec.call("markers", domain=GUEST)
        sec.stop()
        sec.start(fault=point)
        with pytest.raises(PluginError):
            pri.call("mark", domain=GUEST)
        assert sec.wait_dead() != 0, f"the fault point {point} was not reached"
        sec.start()
        after = sec.call("markers", domain=GUEST)
        applied, cut = replica_cut(sec)
        assert applied >= before["applied"], point
        assert after["damage"] is None, point
        # the journal continues: the primary's next cycle lands and applies
        marker = pri.call("mark", domain=GUEST)
        applied2, cut2 = replica_cut(sec)
        assert applied2 == marker["seq"] and cut2 >= cut, point
        for m in sec.call("markers", domain=GUEST)["markers"]:
            restore_cut(sec, m["seq"], tmp_path)


def test_damaged_segment_stops_the_reflecting_unit(site: dict[str, Any], tmp_path: Path) -> None:
    pri, sec = site["pri"], site["sec"]
    info = pri.call("protect", domain=GUEST, to="sec", rpo=3600, wait=True)
    uuid = info["uuid"]
    sec.call("hold", domain=GUEST)
    ma = pri.call("mark", domain=GUEST)["seq"]
    mb = pri.call("mark", domain=GUEST)["seq"]
    mc = pri.call("mark", domain=GUEST)["seq"]
    seg = sec.storage / uuid / f"vdb.seg-{mb:08d}.qcow2"
    with open(seg, "r+b") as f:   # flip one byte in the segment's data
        f.seek(os.path.getsize(seg) - 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    sec.call("release", domain=GUEST)
    info = sec.call("markers", domain=GUEST)
    assert info["applied"] == ma, "nothing past the damage may be applied"
    assert "does not match its hash" in info["damage"]
    replica_cut(sec)  # the replica is still a consistent cut (marker ma)
    with pytest.raises(PluginError, match="does not match its hash"):
        sec.call("restore", domain=GUEST, marker=mc, to=str(tmp_path / "r"))
    restore_cut(sec, ma, tmp_path)
    with pytest.raises(PluginError, match=f"marker {mb}: segment vdb"):
        sec.call("apply", domain=GUEST, until=mc)
    assert sec.call("markers", domain=GUEST)["applied"] == ma
    # an altered marker record is caught too, after a restart
    sec.stop()
    db = sqlite3.connect(sec.dir / "state" / "state.db")
    db.execute("UPDATE markers SET label = 'tampered' WHERE seq = ?", (ma,))
    db.commit()
    db.close()
    sec.start()
    with pytest.raises(PluginError, match=f"marker {ma}: record checksum mismatch"):
        sec.call("restore", domain=GUEST, marker=ma, to=str(tmp_path / "r2"))


@pytest.mark.parametrize("policy", ["refuse", "apply"])
def test_full_journal_is_loud_and_never_drops_a_marker(lab_pair: LabPair, policy: str) -> None:
    """Held journal over its space limit: "refuse" fails new cycles with a clear
    reason until space is made; "apply" applies and folds the oldest markers
    (audited) to take the new one. Either way no committed marker vanishes
    unannounced and the replica stays a consistent cut."""
    start_writing_guest(lab_pair.pri, GUEST, DISKS, BLOCKS, size="8M")
    journal = {"max_bytes": 3 << 20, "on_full": policy, "retain_markers": 1}
    with open_site(lab_pair, journal=journal) as s:
        s.domains.append(GUEST)
        pri, sec = s.pri, s.sec
        pri.call("protect", domain=GUEST, to="sec", rpo=3600, wait=True)
        sec.call("hold", domain=GUEST)
        seqs = []
        for _ in range(8):   # each held marker keeps its segments: the journal grows
            time.sleep(0.3)
            try:
                seqs.append(pri.call("mark", domain=GUEST)["seq"])
            except PluginError as e:
                assert policy == "refuse" and "journal full" in str(e), e
                break
        info = sec.call("markers", domain=GUEST)
        if policy == "refuse":
            assert len(seqs) < 8, "the limit was never reached"
            assert info["journal_bytes"] > info["journal_limit"]
            pairs = pri.call("pairs", domain=GUEST)["pairs"]
            assert all(p["state"] == "error" and "journal full" in p["reason"] for p in pairs), pairs
            assert [m["seq"] for m in info["markers"]][-len(seqs):] == seqs  # nothing dropped
            sec.call("release", domain=GUEST)            # apply + retention make room
            seqs.append(pri.call("mark", domain=GUEST)["seq"])
        else:
            assert len(seqs) == 8
            # to make room the policy applied everything before the newest cut,
            # past the hold; the newest one stays held, and still listed
            assert info["applied"] == seqs[-2], "policy apply moves the replica past the hold"
            assert info["markers"][-1]["seq"] == seqs[-1]
        replica_cut(sec)
        assert "journal-full" in agent_rows_audit(sec)  # loud: recorded under either policy


def agent_rows_audit(agent: LabAgent) -> set[str]:
    import sqlite3

    db = sqlite3.connect(f"file:{agent.dir / 'state' / 'state.db'}?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT event FROM audit")}
    finally:
        db.close()


APPLY_DELAY = 3.0


def test_apply_delay_holds_a_marker_back_then_applies_it_on_time(lab_pair: LabPair, tmp_path: Path) -> None:
    """``[journal] apply_delay``: a marker reaches the replica once it is that old,
    without another cycle to carry it (after a disaster there is none)."""
    start_writing_guest(lab_pair.pri, GUEST, DISKS, BLOCKS, size="8M")
    with open_site(lab_pair, journal={"apply_delay": APPLY_DELAY}) as s:
        s.domains.append(GUEST)
        pri, sec = s.pri, s.sec
        pri.call("protect", domain=GUEST, to="sec", rpo=3600, wait=True)
        time.sleep(0.3)
        seq = pri.call("mark", domain=GUEST)["seq"]
        info = sec.call("markers", domain=GUEST)
        cut_time = info["markers"][-1]["cut_time"]
        assert info["markers"][-1]["seq"] == seq
        if time.time() - cut_time < APPLY_DELAY - 0.5:   # asked well inside the delay
            assert info["applied"] < seq, "applied before its delay had passed"
        cut = restore_cut(sec, seq, tmp_path)
        wait_for(f"marker {seq} to be applied", lambda: sec.call("markers", domain=GUEST)["applied"] >= seq,
                 timeout=APPLY_DELAY + 15, poll=0.2)
        applied_at = time.time()
        assert applied_at - cut_time >= APPLY_DELAY - 0.05, "applied before its delay had passed"
        assert replica_cut(sec) == (seq, cut)
        assert sec.call("markers", domain=GUEST)["markers"][-1]["seq"] == seq, "no later cycle carried it"
