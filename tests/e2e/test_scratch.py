"""A ``[replication] scratch`` too small for a cycle's stages.

A stage that filled up would fail the guest's writes (QEMU 7.2's backup breaks a
guest write whose copy-before-write fails), so the agent checks the room first;
when the stages would not fit, the cycle sends straight to the link instead.
Markers stay exact either way: checked against the guest's write log.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import stamps
from tests.lab.fixtures import LabPair
from tests.lab.site import Site, WritingGuest, check_replica, dirtied_bytes, open_site, start_writing_guest

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]

GUEST = "tight01"
DISKS, BLOCKS = 2, 1024


@pytest.fixture
def site(lab_pair: LabPair, tmp_path: Path) -> Iterator[tuple[Site, WritingGuest, Path]]:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # 16 MiB: less than any cycle's estimate (the margin alone is 64 MiB).
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "vs-tight", str(scratch)], check=True)
    try:
        guest = start_writing_guest(lab_pair.pri, GUEST, DISKS, BLOCKS, size="8M")
        with open_site(lab_pair, scratch=str(scratch)) as s:
            s.domains.append(GUEST)
            yield s, guest, scratch
    finally:
        subprocess.run(["umount", "-l", str(scratch)], check=False)


def test_stages_that_would_not_fit_go_straight_to_the_link(site: tuple[Site, WritingGuest, Path]) -> None:
    s, guest, scratch = site
    oracle = stamps.Oracle(DISKS, BLOCKS)
    s.pri.call("protect", domain=GUEST, to="sec", rpo=3600, wait=True)
    cut1 = check_replica(s, GUEST, oracle)
    marker = s.pri.call("mark", domain=GUEST)
    cut2 = check_replica(s, GUEST, oracle)
    assert marker["kind"] == "incremental"
    for disk, n in dirtied_bytes(oracle, cut1, cut2).items():
        assert n <= marker["bytes"][disk] <= 1.1 * n, (disk, marker["bytes"][disk], n)
    assert list(scratch.iterdir()) == [], "no stage was made"
    assert "this cycle sends straight to the link" in s.pri.log.read_text()
