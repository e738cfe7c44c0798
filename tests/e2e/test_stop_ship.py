"""A stop loses nothing the guest's disk acknowledged; a start resumes incrementally;
a killed QEMU makes the pairs need a resync (issue 12, plugin/replication/offline.py).

One pair of lab hosts and one writing guest for the whole module; its writes continue
one sequence across every stop (each boot starts at the next number), so one oracle
checks every marker. In order, the guest is stopped by ``virsh destroy``, ``virsh
managedsave`` (restored by ``virsh start``), ``virsh shutdown --mode agent`` (the guest
stops writing, syncs and powers off), and its own power-off after a count of writes
fixed on its command line; and once a start comes while the ship at stop runs (the
start wins). After each stop the newest marker on the secondary, cut
"at stop", holds exactly writes 1..N, N being the guest's last write, and equals the
source images byte for byte; the markers since the previous stop carried what the
guest dirtied meanwhile (no full copy). Then QEMU is SIGKILLed while the guest writes:
the pairs say ``needs resync``, and after the next start the replica equals the
source at a marker.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import stamps
from tests.lab.fixtures import LabPair
from tests.lab.guest import shutdown_seq, wait_for_console
from tests.lab.site import (
    Site,
    WritingGuest,
    check_marker,
    check_replica,
    increments,
    open_site,
    replica_paths,
    set_next_boot,
    start_writing_guest,
    wait_for,
)

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]

GUEST = "stop01"
DISKS, BLOCKS, SIZE = 2, 2048, "16M"   # the guest writes blocks 0..2047 (8 MiB) of 16 MiB disks
MORE = 300                            # writes between a start and the next stop
COUNT = 400                           # the writes of the boot that powers itself off
SPEED = 2 << 20                       # bytes/s per job: a ship at stop takes seconds


@pytest.fixture(scope="module")
def site(module_lab_pair: LabPair) -> Iterator[tuple[Site, WritingGuest]]:
    with open_site(module_lab_pair, start=False, speed_limit=SPEED) as s:
        s.pri.install_hook()   # its prepare call lets a start win over a ship
        s.pri.start()
        s.sec.start()
        guest = start_writing_guest(module_lab_pair.pri, GUEST, DISKS, BLOCKS, size=SIZE, qga=True)
        s.domains.append(GUEST)
        # A long RPO: between a start and a stop, markers come only from the start and the stop.
        s.pri.call("protect", domain=GUEST, to="sec", rpo=3600, wait=True, timeout=120)
        yield s, guest


class Rounds:
    """The sequence so far: the last write N the replica was checked at, and its marker."""

    def __init__(self, s: Site, guest: WritingGuest) -> None:
        self.s, self.guest = s, guest
        self.oracle = stamps.Oracle(DISKS, BLOCKS)
        self.n = check_replica(s, GUEST, self.oracle)
        self.marker = self.newest()["seq"]
        self.sent: list[tuple[str, dict[str, int], dict[str, int]]] = []
        self.started = 0   # first write of the newest boot
        self.cuts: dict[int, int] = {}   # marker -> the write it holds

    def newest(self) -> dict:  # type: ignore[type-arg]
        return self.s.sec.call("markers", domain=GUEST)["markers"][-1]

    def pairs(self) -> list[dict]:  # type: ignore[type-arg]
        return self.s.pri.call("pairs", domain=GUEST)["pairs"]

    def boot(self, count: int = 0, after: int | None = None) -> None:
        """Start the shut-off guest, its writes continuing the sequence after N (or ``after``)."""
        host = self.s.hosts.pri
        start = (self.n if after is None else after) + 1
        set_next_boot(host, GUEST, start, count)
        host.virsh("start", GUEST)
        self.started = start
        wait_for_console(self.guest.serial, f"VS-READY .* start={start}", timeout=120)
        wait_for("the pairs to follow the start", lambda: {p["state"] for p in self.pairs()} == {"active"},
                 timeout=60, poll=0.2)

    def write_more(self) -> None:
        upto = max(self.n, self.started - 1) + MORE
        wait_for(f"the guest to write {MORE} blocks", lambda: self.guest.last_seq() >= upto, timeout=240, poll=0.2)

    def check_stopped(self, how: str, last_write: int | None = None) -> int:
        """After a stop: the replica at the newest marker is the source, at write N."""
        wait_for(f"the pairs to say stopped after {how}", lambda: all(
            p["state"] == "stopped" and "replica complete" in p["reason"] for p in self.pairs()),
            timeout=180, poll=0.2)
        source = stamps.check_images(self.guest.disks, self.oracle)
        assert source.ok, source.summary()
        n = source.cut_seq
        if last_write is not None:
            assert n == last_write, (how, n, last_write)
        marker = self.newest()
        assert marker["label"] == "at stop" and marker["seq"] > self.marker, (how, marker)
        assert check_replica(self.s, GUEST, self.oracle) == n, how
        for src, replica in zip(self.guest.disks, replica_paths(self.s, GUEST), strict=True):
            cmp = subprocess.run(["qemu-img", "compare", "-U", src, replica], capture_output=True, text=True)
            assert cmp.returncode == 0, (how, cmp.stdout, cmp.stderr)
        self.check_bytes(how, upto=marker["seq"], last_cut=n)
        self.n, self.marker = n, marker["seq"]
        return n

    def cut_of(self, seq: int) -> int:
        """The write a marker holds: restored and checked against the oracle."""
        if seq in self.cuts:
            return self.cuts[seq]
        result = check_marker(self.s, GUEST, seq, self.oracle)
        assert result.ok, (seq, result.summary())
        self.cuts[seq] = result.cut_seq
        return result.cut_seq

    def check_bytes(self, how: str, upto: int, last_cut: int | None = None) -> None:
        """Each marker since the last check sent what the guest dirtied between its cut
        and the previous one (a cluster written on both sides of a cut goes twice): no full copy."""
        new = [m for m in self.s.sec.call("markers", domain=GUEST)["markers"] if self.marker < m["seq"] <= upto]
        assert new, how

        def cut_of(seq: int) -> int:
            return last_cut if seq == new[-1]["seq"] and last_cut is not None else self.cut_of(seq)

        found = increments(new, self.oracle, self.n, cut_of)
        for inc in found:
            assert inc.close, (how, inc)
        sent = {t: sum(inc.sent[t] for inc in found) for t in ("vda", "vdb")}
        dirtied = {t: sum(inc.dirtied[t] for inc in found) for t in ("vda", "vdb")}
        print(f"{how}: writes {self.n + 1}..{found[-1].cut}, markers {[inc.seq for inc in found]}: sent {sent}, "
              f"dirtied {dirtied}")
        self.sent.append((how, sent, dirtied))


def test_every_stop_ships_the_last_writes_and_starts_resume_incrementally(
        site: tuple[Site, WritingGuest]) -> None:
    s, guest = site
    host = s.hosts.pri
    r = Rounds(s, guest)

    # 1. virsh destroy while the guest writes.
    r.write_more()
    host.virsh("destroy", GUEST)
    r.check_stopped("destroy")
    # The agent restarts while the domain is shut off: nothing to ship, no new marker.
    s.pri.stop()
    s.pri.start()
    wait_for("the restarted agent to see the stopped domain", lambda: all(
        p["state"] == "stopped" and "replica complete" in p["reason"] for p in r.pairs()), timeout=60, poll=0.2)
    assert r.newest()["seq"] == r.marker

    # A start while the ship at stop runs: the start wins (the prepare hook aborts the
    # ship, the images are closed before QEMU opens them); its bits go with the next marker.
    r.boot()
    r.write_more()
    before = r.newest()["seq"]   # the start's catch-up marker
    host.virsh("destroy", GUEST)

    def shipping() -> bool:
        ps = r.pairs()
        done, total = sum(p["bytes_done"] for p in ps), sum(p["bytes_total"] for p in ps)
        return all(p["state"] == "stopped" for p in ps) and 0 < done < 0.6 * total

    wait_for("the ship at stop to run", shipping, timeout=60, poll=0.05)
    assert r.newest()["seq"] == before
    raced = stamps.check_images(guest.disks, r.oracle, force_share=True)
    assert raced.ok, raced.summary()
    r.boot(after=raced.cut_seq)
    assert "the ship at stop was aborted" in s.pri.log.read_text(errors="replace"), s.pri.tail(60)
    assert not [m for m in s.sec.call("markers", domain=GUEST)["markers"] if m["label"] == "at stop"
                and m["seq"] > before], "the aborted ship cut no marker"
    # The start's first marker (cut as the supervisor attaches, before the guest writes)
    # carries the aborted ship's bits: what the guest dirtied since the last check.
    catch_up = wait_for("the start's first marker", lambda: [
        m for m in s.sec.call("markers", domain=GUEST)["markers"] if m["seq"] > before], timeout=120, poll=0.2)[0]
    r.check_bytes("start during the ship", upto=catch_up["seq"])
    r.n, r.marker = r.cut_of(catch_up["seq"]), catch_up["seq"]

    # 2. virsh managedsave; virsh start restores the guest, which goes on writing.
    r.write_more()
    host.virsh("managedsave", GUEST)
    r.check_stopped("managedsave")
    host.virsh("start", GUEST)
    wait_for("the pairs to follow the restore", lambda: {p["state"] for p in r.pairs()} == {"active"},
             timeout=60, poll=0.2)

    # 3. virsh shutdown through the guest agent: the guest stops writing and powers off.
    r.write_more()
    host.virsh("shutdown", "--mode", "agent", GUEST)
    wait_for_console(guest.serial, r"VS-SHUTDOWN seq=\d+", timeout=60)
    r.check_stopped("shutdown", last_write=shutdown_seq(guest.serial))

    # 4. The guest powers itself off after COUNT writes (its last write fixed from outside).
    first = r.n + 1
    r.boot(count=COUNT)
    wait_for_console(guest.serial, f"VS-DONE seq={first + COUNT - 1}", timeout=240)
    r.check_stopped("guest power-off", last_write=first + COUNT - 1)

    total_sent = sum(sum(sent.values()) for _, sent, _ in r.sent)
    total_dirtied = sum(sum(d.values()) for _, _, d in r.sent)
    print(f"all stops: sent {total_sent} bytes, dirtied {total_dirtied} bytes")


def test_qemu_killed_needs_resync_then_the_start_recopies(site: tuple[Site, WritingGuest]) -> None:
    s, guest = site
    host = s.hosts.pri
    r = Rounds(s, guest)
    if "running" not in host.virsh("domstate", GUEST):   # shut off by the test before
        r.boot()
    r.write_more()
    before = r.newest()["seq"]
    qemu_pid = int((Path(host.root) / f"run/libvirt/qemu/{GUEST}.pid").read_text())
    os.kill(qemu_pid, signal.SIGKILL)
    wait_for("the pairs to need a resync", lambda: all(
        p["state"] == "needs resync" and "did not exit cleanly" in p["reason"] for p in r.pairs()),
        timeout=120, poll=0.2)
    status = [d for d in s.pri.call("status")["domains"] if d["domain"] == GUEST]
    assert status[0]["state"] == "needs resync", status
    assert r.newest()["seq"] == before, "nothing shipped from untrusted bitmaps"
    # Killed, QEMU did not flush: a write whose new cluster's mapping was still in QEMU's
    # cache is gone from the image (acknowledged, never flushed: a disk may lose it), so
    # from here the source is compared byte for byte, not with the oracle.
    r.n = stamps.check_images(guest.disks, r.oracle).cut_seq

    # The next start copies the disks in full; then the replica equals the source at a marker.
    r.boot()
    r.write_more()
    host.virsh("suspend", GUEST)
    mark = s.pri.call("mark", domain=GUEST, timeout=180)
    assert r.newest()["seq"] == mark["seq"]
    for src, replica in zip(guest.disks, replica_paths(s, GUEST), strict=True):
        cmp = subprocess.run(["qemu-img", "compare", "-U", src, replica], capture_output=True, text=True)
        assert cmp.returncode == 0, (cmp.stdout, cmp.stderr)
    new = [m for m in s.sec.call("markers", domain=GUEST)["markers"] if before < m["seq"] <= mark["seq"]]
    full = 16 << 20
    print(f"after the kill: markers {[(m['seq'], m['bytes']) for m in new]}")
    assert any(m["bytes"] == {"vda": full, "vdb": full} for m in new), "the disks were copied in full"
    assert {p["state"] for p in r.pairs()} == {"active"}
    host.virsh("resume", GUEST)
