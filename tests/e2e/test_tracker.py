"""The mapping tracker: disks attached, detached and swapped under a protected,
writing guest; every change is seen, recorded and acted on, and the replica
stays right (checked by bytes)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab import stamps
from tests.lab.agent import LabAgent
from tests.lab.fixtures import LabPair
from tests.lab.procs import run
from tests.lab.site import open_site, start_writing_guest

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]

DISKS, BLOCKS = 2, 1024
GUEST = "app01"


@pytest.fixture
def site(lab_pair: LabPair) -> Iterator[dict[str, Any]]:
    guest = start_writing_guest(lab_pair.pri, GUEST, DISKS, BLOCKS, size="8M")
    with open_site(lab_pair, agent={"tracker_interval": 2.0}) as s:
        s.domains.append(GUEST)
        yield {"pri": s.pri, "sec": s.sec, "hosts": lab_pair, "disk_dir": Path(guest.disks[0]).parent}


def wait_change(agent: LabAgent, kind: str, target: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for change in agent.call("tracker", domain=GUEST)["changes"]:
            if change["kind"] == kind and change["target"] == target:
                return change  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"tracker did not see {kind} {target}"
        time.sleep(0.2)


def replica(sec: LabAgent) -> dict[str, str]:
    return sec.call("markers", domain=GUEST)["replica"]  # type: ignore[no-any-return]


def check_guest_disks(sec: LabAgent) -> int:
    views = replica(sec)
    result = stamps.check_images([views["vda"], views["vdb"]], stamps.Oracle(DISKS, BLOCKS))
    assert result.ok, result.summary()
    return result.cut_seq


def test_attach_detach_and_swap_while_agent_down(site: dict[str, Any]) -> None:
    pri, sec, host = site["pri"], site["sec"], site["hosts"].pri
    pri.call("protect", domain=GUEST, to="sec", rpo=3600, wait=True)

    # attach: a pair appears and the new disk joins the next consistent cut
    extra = str(site["disk_dir"] / "extra.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", extra, "4M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 512k 1M", "-c", "write -P 0x3e 3M 64k", extra])
    host.virsh("attach-disk", GUEST, extra, "vdc", "--driver", "qemu", "--subdriver", "qcow2",
               "--targetbus", "virtio", "--live")
    change = wait_change(pri, "added", "vdc")
    assert change["reason"] == "device added" and "full copy" in change["action"]
    marker = pri.call("mark", domain=GUEST)
    assert set(marker["bytes"]) == {"vda", "vdb", "vdc"}
    assert marker["bytes"]["vdc"] == 4 << 20  # a full copy of that disk only
    assert marker["bytes"]["vda"] < 8 << 20
    views = replica(sec)
    assert "Images are identical" in run(["qemu-img", "compare", "-U", extra, views["vdc"]])
    check_guest_disks(sec)
    pairs = {p["target"]: p["state"] for p in pri.call("pairs", domain=GUEST)["pairs"]}
    assert pairs == {"vda": "active", "vdb": "active", "vdc": "active"}

    # detach: the pair retires, later markers leave the disk out
    host.virsh("detach-disk", GUEST, "vdc", "--live")
    wait_change(pri, "removed", "vdc")
    assert [p["target"] for p in pri.call("pairs", domain=GUEST)["pairs"]] == ["vda", "vdb"]
    marker = pri.call("mark", domain=GUEST)
    assert set(marker["bytes"]) == {"vda", "vdb"}
    check_guest_disks(sec)

    # a disk's source swapped while the agent is down: found at start, re-copied
    before = marker["seq"]
    pri.stop()
    moved = str(site["disk_dir"] / "vdb-moved.qcow2")
    host.virsh("blockcopy", GUEST, "vdb", moved, "--format", "qcow2", "--wait", "--pivot", "--transient-job",
               timeout=120)
    pri.start()
    change = wait_change(pri, "retargeted", "vdb")
    assert change["reason"] == "agent start" and moved in change["detail"]
    pri.call("mark", domain=GUEST)
    first = next(m for m in sec.call("markers", domain=GUEST)["markers"] if m["seq"] > before)
    assert first["bytes"]["vdb"] == 8 << 20  # full copy of the new source: no stale bits trusted
    assert first["bytes"]["vda"] < 8 << 20   # the other disk goes on incrementally
    check_guest_disks(sec)
