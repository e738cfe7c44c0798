"""Asynchronous copy pairs between two lab hosts, proved by bytes.

The primary lab host runs the writing Linux guest (two disks) under its own
libvirtd; each host runs its own virtsyncd inside its network namespace. After
every marker the replica must match the guest's write log block for block at
one sequence number across both disks (a consistent cut), and each cycle must
have sent exactly the 64 KiB clusters the guest dirtied since the last one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from plugin.errors import PluginError
from tests.lab import stamps
from tests.lab.fixtures import LabPair
from tests.lab.netfault import link_down, link_up
from tests.lab.site import dirtied_bytes, open_site, start_writing_guest

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]

DISKS, BLOCKS = 2, 2048          # 8 MiB written per disk, in 4 KiB stamped blocks
GUEST = "web01"


@pytest.fixture
def site(lab_pair: LabPair) -> Iterator[dict]:  # type: ignore[type-arg]
    guest = start_writing_guest(lab_pair.pri, GUEST, DISKS, BLOCKS, size="16M")
    with open_site(lab_pair) as s:
        s.domains.append(GUEST)
        yield {"pri": s.pri, "sec": s.sec, "disks": guest.disks, "serial": guest.serial, "hosts": lab_pair}


def replica_paths(site: dict, uuid: str) -> list[str]:  # type: ignore[type-arg]
    """The replica's disks as the secondary reports them (chain tops at the applied marker)."""
    views = site["sec"].call("markers", domain=GUEST)["replica"]
    return [views[t] for t in sorted(views)]


def check_replica(site: dict, uuid: str, oracle: stamps.Oracle) -> int:  # type: ignore[type-arg]
    """The replica holds a consistent cut: return its sequence number."""
    result = stamps.check_images(replica_paths(site, uuid), oracle)
    assert result.ok, result.summary()
    return result.cut_seq


def test_protect_markers_link_cut_and_unprotect(site: dict) -> None:  # type: ignore[type-arg]
    pri, sec = site["pri"], site["sec"]
    oracle = stamps.Oracle(DISKS, BLOCKS)
    # A long RPO: cycles come from `mark`, so that each can be checked alone.
    result = pri.call("protect", domain=GUEST, to="sec", rpo=3600, wait=True)
    uuid = result["uuid"]
    assert {p["state"] for p in result["pairs"]} == {"active"}
    cut = check_replica(site, uuid, oracle)
    assert cut > 0

    # Several markers while the guest writes: each replica is the cut, and
    # each increment carried exactly the clusters dirtied since the last one.
    for _ in range(3):
        time.sleep(0.5)
        marker = pri.call("mark", domain=GUEST, label="check")
        assert marker["kind"] == "incremental"
        new_cut = check_replica(site, uuid, oracle)
        assert new_cut > cut, "the guest wrote, the replica did not move"
        expected = dirtied_bytes(oracle, cut, new_cut)
        print(f"marker {marker['seq']}: sent {marker['bytes']}, dirtied {expected} (writes {cut + 1}..{new_cut})")
        assert marker["bytes"] == expected
        cut = new_cut

    pairs = pri.call("pairs", domain=GUEST)["pairs"]
    assert [p["target"] for p in pairs] == ["vda", "vdb"]
    assert all(p["state"] == "active" and p["last_marker"] == marker["seq"] for p in pairs)
    markers = pri.call("markers", domain=GUEST)["markers"]
    assert [m["seq"] for m in markers] == list(range(1, marker["seq"] + 1))

    # Link cut: a cycle fails visibly and is retried; after the link returns it
    # catches up with an increment, not a full copy.
    link_down(site["hosts"].pri)
    with pytest.raises(PluginError, match="unreachable"):
        pri.call("mark", domain=GUEST, label="during-cut")
    pairs = pri.call("pairs", domain=GUEST)["pairs"]
    assert all(p["state"] == "disconnected" and "unreachable since" in p["reason"] and "retrying" in p["reason"]
               for p in pairs), pairs
    time.sleep(1.0)
    link_up(site["hosts"].pri)
    deadline = time.monotonic() + 60
    while pri.call("markers", domain=GUEST)["markers"][-1]["seq"] == marker["seq"]:
        assert time.monotonic() < deadline, "no marker after the link came back"
        time.sleep(0.2)
    pri.call("suspend", domain=GUEST)
    markers = pri.call("markers", domain=GUEST)["markers"]
    new_cut = check_replica(site, uuid, oracle)
    sent = {}
    for m in markers:
        if m["seq"] > marker["seq"]:
            for disk, n in m["bytes"].items():
                sent[disk] = sent.get(disk, 0) + n
    expected = dirtied_bytes(oracle, cut, new_cut)
    print(f"after the cut: sent {sent}, dirtied {expected}")
    for disk in expected:
        assert sent[disk] <= 1.1 * expected[disk]
    assert all(p["state"] == "suspended" for p in pri.call("pairs", domain=GUEST)["pairs"])

    # Suspend keeps tracking; resume sends only what changed.
    time.sleep(0.5)
    pri.call("resume", domain=GUEST)
    marker = pri.call("mark", domain=GUEST)
    assert marker["kind"] == "incremental"
    final_cut = check_replica(site, uuid, oracle)
    assert marker["bytes"] == dirtied_bytes(oracle, new_cut, final_cut)

    # Unprotect removes everything virtsync created, here and on the secondary.
    pri.call("unprotect", domain=GUEST)
    reply = json.loads(site["hosts"].pri.virsh("qemu-monitor-command", GUEST, '{"execute":"query-named-block-nodes","arguments":{"flat":true}}'))
    names = [n["node-name"] for n in reply["return"]]
    bitmaps = [b["name"] for n in reply["return"] for b in n.get("dirty-bitmaps", [])]
    assert not [n for n in names if n.startswith("vs-")]
    assert not [b for b in bitmaps if b.startswith("vs-")]
    assert not (sec.storage / uuid).exists()
    xml = site["hosts"].pri.virsh("dumpxml", GUEST)
    assert "urn:x-virtsync" not in xml
