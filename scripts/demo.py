"""make demo: the main job on this one machine, as far as it exists today.

Two lab hosts (each its own network namespace, mount namespace and libvirtd),
a Linux guest on the primary writing stamped blocks to two disks, a virtsync
agent on each host. The guest is protected with the real CLI, cycles run,
markers are shown, one marker is restored on the secondary and checked block
for block against the guest's own write log; then everything is torn down.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab import stamps  # noqa: E402
from tests.lab.agent import LabAgent  # noqa: E402
from tests.lab.host import LabHost, lab_prerequisites, link_hosts  # noqa: E402
from tests.lab.site import start_writing_guest  # noqa: E402

GUEST, DISKS, BLOCKS = "web01", 2, 2048


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def virtsync(agent: LabAgent, *args: str) -> None:
    """Run the real CLI against an agent's socket and show it."""
    print(f"$ virtsync {' '.join(args)}    # on {agent.host.name}", flush=True)
    subprocess.run([sys.executable, "-m", "plugin.cli", "--socket", agent.socket, *args], cwd=ROOT, check=True)


def main() -> int:
    reason = lab_prerequisites()
    if reason:
        print(f"demo: cannot run here: {reason}", file=sys.stderr)
        return 1
    print("virtsync demo. What exists today: the QMP block layer, copy pairs with consistent cuts,\n"
          "the journal with markers, hold/apply and point-in-time restore, the mapping tracker,\n"
          "TLS on both links. Not yet: the RPO planner, switchover and migration.")
    pri, sec = LabHost("pri"), LabHost("sec")
    agents: list[LabAgent] = []
    try:
        link_hosts(pri, sec)
        for host in (pri, sec):
            host.launch()
        for host in (pri, sec):
            host.wait_ready()
        say(f"two lab hosts: pri {pri.address}, sec {sec.address}, each with its own libvirtd")

        start_writing_guest(pri, GUEST, DISKS, BLOCKS, size="16M", timeout=120)
        say(f"{GUEST} runs on pri (TCG), writing stamped 4 KiB blocks to vda and vdb")

        agents = [LabAgent(pri, {"sec": sec}), LabAgent(sec, {"pri": pri})]
        for agent in agents:
            agent.start()
        a_pri, a_sec = agents
        say("virtsyncd runs on both hosts")
        virtsync(a_pri, "protect", GUEST, "--to", "sec", "--rpo", "4", "--wait")
        time.sleep(6)
        say("cycles every RPO/2 while the guest writes")
        virtsync(a_pri, "pairs")
        virtsync(a_pri, "status")
        virtsync(a_pri, "mark", GUEST, "--label", "demo", "--wait")
        virtsync(a_sec, "markers", GUEST)

        info = a_sec.call("markers", domain=GUEST)
        seq = next(m["seq"] for m in reversed(info["markers"]) if m["label"] == "demo")
        dest = tempfile.mkdtemp(prefix="vs-demo-restore-")
        os.rmdir(dest)
        say(f"restore marker {seq} on sec and check it against the guest's write log")
        virtsync(a_sec, "restore", GUEST, "--marker", str(seq), "--to", dest)
        result = a_sec.call("restore", domain=GUEST, marker=seq, to=dest + "-again")
        check = stamps.check_images([result["disks"][t] for t in sorted(result["disks"])],
                                    stamps.Oracle(DISKS, BLOCKS))
        print(f"marker {seq}: the guest's writes 1..{check.cut_seq} on both disks, "
              f"{check.blocks_verified} blocks verified, {len(check.mismatches)} mismatches")
        virtsync(a_pri, "unprotect", GUEST)
        ok = check.ok and check.cut_seq > 0
        for path in (dest, dest + "-again"):
            shutil.rmtree(path, ignore_errors=True)
        say("verified: a consistent cut across both disks" if ok else "FAILED: " + check.summary())
        return 0 if ok else 1
    finally:
        for agent in agents:
            agent.stop()
        pri.virsh("destroy", GUEST, check=False)
        for host in (pri, sec):
            host.stop()
        print("\n== torn down: no lab host, agent or guest left running")


if __name__ == "__main__":
    sys.exit(main())
