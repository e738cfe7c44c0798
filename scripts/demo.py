"""make demo: the main job on this one machine, as far as it exists today.

Two lab hosts (each its own network namespace, mount namespace and libvirtd),
a Linux guest on the primary writing stamped blocks to two disks, a virtsync
agent on each host and its libvirt hook on the primary. The guest is protected
with the real CLI, cycles run, markers are shown, one marker is restored on the
secondary and checked block for block against the guest's own write log. Then
the guest is shut down: its last writes are shipped from its images (a marker
"at stop"); started again, it writes more and powers itself off, and only what
it dirtied crosses. A scrub (``virtsync verify``) checks the replica. Everything
is torn down at the end, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.lab import stamps  # noqa: E402
from tests.lab.agent import LabAgent  # noqa: E402
from tests.lab.fixtures import LabPair  # noqa: E402
from tests.lab.guest import shutdown_seq, wait_for_console  # noqa: E402
from tests.lab.host import LabHost, lab_prerequisites, running_hosts  # noqa: E402
from tests.lab.site import (  # noqa: E402
    Site,
    WritingGuest,
    check_marker,
    increments,
    open_site,
    set_next_boot,
    start_writing_guest,
    wait_for,
)

GUEST, DISKS, BLOCKS, SIZE = "web01", 2, 2048, "16M"
MORE = 300                      # writes of the boot after the shutdown; then the guest powers itself off
FULL = DISKS * (16 << 20)       # bytes of a full copy of both disks


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def proved(checks: list[tuple[str, bool]], what: str, ok: bool) -> None:
    """One line of what a step proves, kept for the report."""
    checks.append((what, ok))
    print(f"{'proved' if ok else 'FAILED'}: {what}", flush=True)


def virtsync(agent: LabAgent, *args: str, check: bool = True) -> int:
    """Run the real CLI against an agent's socket and show it; its exit code."""
    print(f"$ virtsync {' '.join(args)}    # on {agent.host.name}", flush=True)
    return subprocess.run([sys.executable, "-m", "plugin.cli", "--socket", agent.socket, *args],
                          cwd=ROOT, check=check).returncode


def virsh(host: LabHost, *args: str) -> None:
    print(f"$ virsh {' '.join(args)}    # on {host.name}", flush=True)
    out = host.virsh(*args).strip()
    if out:
        print(out, flush=True)


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def at_stop(site: Site, oracle: stamps.Oracle, last_write: int, how: str, checks: list[tuple[str, bool]]) -> int:
    """After a stop: pairs say stopped; the newest marker is "at stop" and holds exactly the
    guest's writes 1..last_write. Return that marker."""
    wait_for(f"the pairs to say stopped after {how}", lambda: all(
        p["state"] == "stopped" and "replica complete" in p["reason"]
        for p in site.pri.call("pairs", domain=GUEST)["pairs"]), timeout=180, poll=0.2)
    virtsync(site.pri, "pairs")
    virtsync(site.sec, "markers", GUEST)
    newest = site.sec.call("markers", domain=GUEST)["markers"][-1]
    result = check_marker(site, GUEST, newest["seq"], oracle, at=last_write)
    proved(checks, f"{how}: marker {newest['seq']} \"{newest['label']}\" holds exactly the guest's writes "
           f"1..{last_write} (its last), {result.blocks_verified} blocks checked, {len(result.mismatches)} mismatches",
           newest["label"] == "at stop" and result.ok)
    return int(newest["seq"])


def run(site: Site, checks: list[tuple[str, bool]]) -> None:
    pri, sec = site.hosts
    a_pri, a_sec = site.pri, site.sec
    oracle = stamps.Oracle(DISKS, BLOCKS)
    say(f"two lab hosts: pri {pri.address}, sec {sec.address}, each with its own libvirtd")

    a_pri.install_hook()
    guest: WritingGuest = start_writing_guest(pri, GUEST, DISKS, BLOCKS, size=SIZE, timeout=120, qga=True)
    site.domains.append(GUEST)
    say(f"{GUEST} runs on pri (TCG), writing stamped 4 KiB blocks to vda and vdb")

    a_pri.start()
    a_sec.start()
    say("virtsyncd runs on both hosts; libvirt's hook on pri calls it")
    virtsync(a_pri, "protect", GUEST, "--to", "sec", "--rpo", "4", "--wait")
    time.sleep(6)
    say("cycles every RPO/2 while the guest writes")
    virtsync(a_pri, "pairs")
    virtsync(a_pri, "status")
    virtsync(a_pri, "mark", GUEST, "--label", "demo", "--wait")
    virtsync(a_sec, "markers", GUEST)

    info = a_sec.call("markers", domain=GUEST)
    seq = next(m["seq"] for m in reversed(info["markers"]) if m["label"] == "demo")
    say(f"restore marker {seq} on sec and check it against the guest's write log")
    virtsync(a_sec, "restore", GUEST, "--marker", str(seq), "--to", str(a_sec.dir / "restore-demo"))
    check = check_marker(site, GUEST, seq, oracle)
    proved(checks, f"marker {seq}: a consistent cut across both disks, the guest's writes 1..{check.cut_seq}, "
           f"{check.blocks_verified} blocks checked, {len(check.mismatches)} mismatches",
           check.ok and check.cut_seq > 0)

    say("virsh shutdown: the guest stops writing, syncs and powers off; virtsync ships its last writes "
        "from the images")
    virsh(pri, "shutdown", "--mode", "agent", GUEST)
    wait_for_console(guest.serial, r"VS-SHUTDOWN seq=\d+", timeout=60)
    last = shutdown_seq(guest.serial)
    stop1 = at_stop(site, oracle, last, "virsh shutdown", checks)

    say(f"virsh start: the guest writes {MORE} blocks more ({last + 1}..{last + MORE}), then powers itself off")
    set_next_boot(pri, GUEST, last + 1, MORE)   # its writes continue the sequence
    virsh(pri, "start", GUEST)
    wait_for_console(guest.serial, f"VS-DONE seq={last + MORE}", timeout=240)
    stop2 = at_stop(site, oracle, last + MORE, "guest power-off", checks)

    # Each marker since the first stop against the clusters the guest wrote between its
    # cut and the one before (the cut found by restoring it): an increment, no full copy.
    cuts_ok = []

    def cut_of(seq: int) -> int:
        if seq == stop2:
            return last + MORE
        result = check_marker(site, GUEST, seq, oracle)
        cuts_ok.append(result.ok)
        return result.cut_seq

    new = [m for m in a_sec.call("markers", domain=GUEST)["markers"] if stop1 < m["seq"] <= stop2]
    found = increments(new, oracle, last, cut_of)
    sent = sum(sum(inc.sent.values()) for inc in found)
    dirtied = sum(sum(inc.dirtied.values()) for inc in found)
    proved(checks, f"after the start: markers {stop1 + 1}..{stop2} sent {mib(sent)} for the {mib(dirtied)} the guest "
           f"dirtied, each within 10 % (a full copy: {mib(FULL)})",
           bool(found) and all(cuts_ok) and all(inc.close for inc in found))

    say("virtsync verify on sec: the replica's base, segments and chunk hashes are read back and checked (a scrub)")
    code = virtsync(a_sec, "verify", GUEST, check=False)
    proved(checks, "virtsync verify: the replica has no damage", code == 0)
    virtsync(a_pri, "unprotect", GUEST)


def _interrupt_once(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not cut the teardown short
    raise KeyboardInterrupt


def main() -> int:
    reason = lab_prerequisites()
    if reason:
        print(f"demo: cannot run here: {reason}", file=sys.stderr)
        return 1
    print("virtsync demo. What exists today: the QMP block layer, copy pairs with consistent cuts,\n"
          "the journal with markers, hold/apply and point-in-time restore, the mapping tracker,\n"
          "TLS on both links, protection through stop and start, replica integrity (verify).\n"
          "Not yet: the RPO planner, switchover and migration.")
    signal.signal(signal.SIGINT, _interrupt_once)
    t0 = time.monotonic()
    checks: list[tuple[str, bool]] = []
    try:
        with running_hosts("pri", "sec") as (pri, sec), open_site(LabPair(pri, sec), start=False) as site:
            run(site, checks)
    except KeyboardInterrupt:
        print("\n== interrupted", flush=True)
        return 130
    finally:
        print("\n== torn down: no lab host, agent or guest left running", flush=True)
    say(f"report ({time.monotonic() - t0:.0f} s)")
    for what, ok in checks:
        print(f"  {'ok    ' if ok else 'FAILED'}  {what}")
    return 0 if checks and all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
