"""``python -m bench.verify_speed``: what a replica's integrity checks cost per GiB.

Makes a qcow2 "base" of ``--gib`` GiB with every cluster written (``qemu-io``), then
times, ``--runs`` times each: recording its chunk hashes (the first full copy),
checking every chunk and its metadata (what ``virtsync verify`` does to a base), and
hashing the same file per MiB as a sealed segment is hashed. Needs only
``qemu-img``/``qemu-io``; the page cache is warm after the first pass, so the
figures are CPU (SHA-256) bound, as a scrub of a recently written replica is.
Prints seconds per GiB and the load average: only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence

from plugin.replication import integrity


def timed(what: Callable[[], object]) -> float:
    started = time.perf_counter()
    what()
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.verify_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vs-verify-") as tmp:
        base = os.path.join(tmp, "vda.base.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, f"{args.gib}G"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x3c 0 {args.gib}G", base], check=True,
                       capture_output=True)
        sums_path = integrity.sums_path(base)
        for run in range(args.runs):
            seal = timed(lambda: integrity.seal_base(base, 1))
            check = timed(lambda: (integrity.check_base_chunks(base, integrity.load_sums(sums_path)),
                                   integrity.check_metadata(base)))
            seg = timed(lambda: integrity.file_chunk_digests(base))
            print(f"run {run + 1}: record base {seal / args.gib:.2f} s/GiB, verify base {check / args.gib:.2f} s/GiB, "
                  f"segment hashes {seg / args.gib:.2f} s/GiB")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
