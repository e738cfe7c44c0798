"""The primary's agent is SIGKILLed while a cycle's stages are being shipped.

The storage daemon that ships dies with it (PDEATHSIG); the guest's QEMU keeps
the frozen and the new bitmap generations and the stage files stay in
``scratch``. Restarted, the agent sweeps what the killed cycle left, folds the
bitmaps back and the next marker is an increment carrying every cluster the
guest dirtied since the last committed marker: checked against the guest's
write log, with nothing of the killed cycle left anywhere.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import stamps
from tests.lab.fixtures import LabPair
from tests.lab.site import (
    Site,
    WritingGuest,
    check_replica,
    cycles,
    dirtied_bytes,
    domain_leftovers,
    open_site,
    start_writing_guest,
    wait_for,
)

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]

GUEST = "crash01"
DISKS, BLOCKS, SIZE = 2, 1024, 8 << 20    # the guest writes blocks 0..1023 (4 MiB) of 8 MiB disks
SPEED = 2 << 20                            # bytes/s per job: the ship takes seconds


@pytest.fixture
def site(lab_pair: LabPair) -> Iterator[tuple[Site, WritingGuest]]:
    guest = start_writing_guest(lab_pair.pri, GUEST, DISKS, BLOCKS, size=f"{SIZE >> 20}M")
    with open_site(lab_pair, speed_limit=SPEED) as s:
        s.domains.append(GUEST)
        yield s, guest


def test_primary_killed_mid_ship_resumes_incrementally(site: tuple[Site, WritingGuest], tmp_path: Path) -> None:
    s, guest = site
    oracle = stamps.Oracle(DISKS, BLOCKS)
    s.pri.call("protect", domain=GUEST, to="sec", rpo=3600, wait=True, timeout=60)
    cut1 = check_replica(s, GUEST, oracle)
    wait_for("the guest to dirty 4 MiB since marker 1",
             lambda: sum(dirtied_bytes(oracle, cut1, guest.last_seq()).values()) >= 4 << 20, timeout=30, poll=0.5)
    s.pri.call("mark", domain=GUEST, wait=False)

    def shipping() -> bool:
        ps = s.pri.call("pairs", domain=GUEST)["pairs"]
        done, total = sum(p["bytes_done"] for p in ps), sum(p["bytes_total"] for p in ps)
        return bool(total) and 0 < done < 0.75 * total and ps[0]["last_marker"] == 1

    wait_for("cycle 2 to ship", shipping, timeout=30)
    s.pri.stop(sig=signal.SIGKILL)
    scratch = s.pri.dir / "state" / "scratch"
    assert sorted(p.name.split("-")[-1] for p in scratch.iterdir()) == ["vda.qcow2", "vdb.qcow2"], \
        "the killed cycle's stages are on disk"
    left = domain_leftovers(s.hosts.pri, GUEST)
    assert sorted(b.split(":")[1] for b in left["bitmaps"]) == ["vs-g1", "vs-g1", "vs-g2", "vs-g2"]

    s.pri.start()
    last = s.pri.call("mark", domain=GUEST, timeout=60)   # marker 2 (or 3: the agent may catch up first)
    check_replica(s, GUEST, oracle)
    markers = s.sec.call("markers", domain=GUEST)["markers"]
    assert [m["seq"] for m in markers] == list(range(1, last["seq"] + 1))
    # Marker 2, the killed cycle's retry: every cluster dirtied since marker 1, incrementally.
    restored = s.sec.call("restore", domain=GUEST, marker=2, to=str(tmp_path / "m2"))["disks"]
    result = stamps.check_images([restored[t] for t in sorted(restored)], oracle)
    assert result.ok, result.summary()
    expected = dirtied_bytes(oracle, cut1, result.cut_seq)
    for disk, n in expected.items():
        assert n <= markers[1]["bytes"][disk] <= 1.1 * n, (disk, markers[1]["bytes"][disk], n)
    assert [c["kind"] for c in cycles(s.pri) if c["error"] is None][:2] == ["full", "incremental"]
    assert all(c["kind"] != "full" for c in cycles(s.pri)[1:]), "no full copy after the kill"
    left = domain_leftovers(s.hosts.pri, GUEST)
    assert (left["nodes"], left["jobs"]) == ([], [])
    assert sorted(b.split(":")[1] for b in left["bitmaps"]) == [f"vs-g{last['seq']}"] * DISKS
    assert list(scratch.iterdir()) == [], "stages removed"
