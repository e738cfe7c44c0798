"""The mapping tracker: disks attached, detached and swapped under a protected,
writing guest; every change is seen, recorded and acted on, and the replica
stays right (checked by bytes)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin.virt import domains
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


def test_disk_grown_under_a_writing_guest_grows_its_replica(site: dict[str, Any]) -> None:
    """``virsh blockresize``: the tracker sees it, the next marker carries the disk at its
    new size, and data written past the old end reaches the replica."""
    pri, sec, host = site["pri"], site["sec"], site["hosts"].pri
    pri.call("protect", domain=GUEST, to="sec", rpo=3600, wait=True)
    host.virsh("blockresize", GUEST, "vdb", "12M")
    wait_change(pri, "resized", "vdb")
    alias = next(d.alias for d in domains.parse_disks(host.virsh("dumpxml", GUEST)) if d.target == "vdb")
    # Past the old 8 MiB end, outside the guest's stamped blocks: as a guest write, through its device.
    host.virsh("qemu-monitor-command", GUEST, "--hmp",
               f'qemu-io -d /machine/peripheral/{alias}/virtio-backend "write -P 0x77 9M 64k"')
    marker = pri.call("mark", domain=GUEST)
    assert marker["bytes"]["vdb"] < 8 << 20, "grown, not re-copied"
    view = replica(sec)["vdb"]
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", view]))
    assert info["virtual-size"] == 12 << 20
    out = run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0x77 9M 64k", "-c", "read -P 0 10M 2M", view])
    assert "Pattern verification failed" not in out, out
    # Zeroed again (the oracle wants zeros beyond the stamped blocks): zeros replicate too.
    host.virsh("qemu-monitor-command", GUEST, "--hmp",
               f'qemu-io -d /machine/peripheral/{alias}/virtio-backend "write -z 9M 64k"')
    pri.call("mark", domain=GUEST)
    check_guest_disks(sec)


def test_excluded_disk_stays_out_until_the_exclusion_is_lifted(site: dict[str, Any]) -> None:
    """``<vs:protection exclude="vdc">``, set by the administrator before protecting:
    protect keeps it, no pair and no byte for vdc; lifted later, vdc joins with a
    full copy of that disk only."""
    pri, sec, host = site["pri"], site["sec"], site["hosts"].pri
    extra = str(site["disk_dir"] / "scratch-disk.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", extra, "4M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x6d 1M 256k", extra])
    host.virsh("attach-disk", GUEST, extra, "vdc", "--driver", "qemu", "--subdriver", "qcow2",
               "--targetbus", "virtio", "--live")
    host.virsh("metadata", GUEST, domains.METADATA_NS, "--key", domains.METADATA_KEY, "--live",
               "--set", '<protection exclude="vdc"/>')

    pri.call("protect", domain=GUEST, to="sec", rpo=3600, wait=True)
    assert [p["target"] for p in pri.call("pairs", domain=GUEST)["pairs"]] == ["vda", "vdb"]
    assert domains.parse_exclude(host.virsh("dumpxml", GUEST)) == {"vdc"}, "protect kept the exclusion"
    time.sleep(2 * 2.0 + 1)  # two tracker timer rounds
    assert not [c for c in pri.call("tracker", domain=GUEST)["changes"] if c["target"] == "vdc"]
    marker = pri.call("mark", domain=GUEST)
    assert set(marker["bytes"]) == {"vda", "vdb"}
    assert set(replica(sec)) == {"vda", "vdb"}
    check_guest_disks(sec)

    # Lifted: the administrator writes the element back without the attribute.
    current = host.virsh("metadata", GUEST, domains.METADATA_NS, "--live")
    host.virsh("metadata", GUEST, domains.METADATA_NS, "--key", domains.METADATA_KEY, "--live",
               "--set", current.replace(' exclude="vdc"', ""))
    wait_change(pri, "added", "vdc")
    marker = pri.call("mark", domain=GUEST)
    assert marker["bytes"]["vdc"] == 4 << 20 and marker["bytes"]["vda"] < 8 << 20
    assert "Images are identical" in run(["qemu-img", "compare", "-U", extra, replica(sec)["vdc"]])
    check_guest_disks(sec)
