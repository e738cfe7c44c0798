"""``python -m bench.tracker_diff``: time the mapping tracker's re-diff of many
domains' disk lists (issue goal: 500 domains under 1 s). Pure CPU, no lab."""

from __future__ import annotations

import argparse
import statistics
import time

from plugin.tracker import DiskEntry, diff


def disk_lists(domains: int, disks: int) -> tuple[list[list[DiskEntry]], list[list[DiskEntry]]]:
    """Each domain's old list, and a new one with one disk added, one removed,
    one re-targeted and one resized (the worst case: every domain changed)."""
    old, new = [], []
    for n in range(domains):
        lst = [DiskEntry(f"vd{chr(97 + i)}", f"/var/lib/libvirt/images/d{n}-{i}.qcow2", "qcow2", 10 << 30)
               for i in range(disks)]
        changed = list(lst[1:-2])
        changed.append(DiskEntry(lst[-2].target, lst[-2].source, "qcow2", 20 << 30))
        changed.append(DiskEntry(lst[-1].target, f"/other/d{n}.qcow2", "qcow2", 10 << 30))
        changed.append(DiskEntry("vdz", f"/new/d{n}.qcow2", "qcow2", 1 << 30))
        changed.append(DiskEntry("hdc", "", "raw", 0, device="cdrom"))
        old.append(lst)
        new.append(changed)
    return old, new


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tracker_diff", description=__doc__.splitlines()[0])
    p.add_argument("--domains", type=int, default=500)
    p.add_argument("--disks", type=int, default=8)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    old, new = disk_lists(args.domains, args.disks)
    times = []
    for _ in range(args.reps):
        started = time.perf_counter()
        changes = sum(len(diff(a, b)) for a, b in zip(old, new, strict=True))
        times.append(time.perf_counter() - started)
    print(f"re-diff of {args.domains} domains x {args.disks} disks ({changes} changes): "
          f"median {statistics.median(times) * 1000:.1f} ms, min {min(times) * 1000:.1f}, "
          f"max {max(times) * 1000:.1f} (goal < 1000 ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
