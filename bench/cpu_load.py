"""A background CPU load of a given size, for calibrating the guest-writer benchmark.

``python -m bench.cpu_load CORES [NICE]`` burns ``CORES`` of CPU (e.g. 0.4) in
10 ms periods, busy for ``CORES`` of each, asleep for the rest, at ``NICE``
(default 10, as virtsync's storage daemon), with no I/O: SHA-256 of a 1 MiB
buffer, the kind of work a replication cycle's hashing and TLS do. Above one
core it runs one such process per started core.

The benchmark runs it beside the guest writer with the CPU that virtsync's own
processes used during the protected window: the writer's loss under this load is
what the machine charges for that much background CPU, with nothing of
virtsync's in it.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import time

PERIOD = 0.010
BUF = bytes(1 << 20)


def burn(share: float) -> None:
    """Busy for ``share`` of every period, forever."""
    while True:
        start = time.monotonic()
        while time.monotonic() - start < share * PERIOD:
            hashlib.sha256(BUF[: 1 << 16]).digest()
        time.sleep(max(0.0, PERIOD - (time.monotonic() - start)))


def start(cores: float, nice: int = 10) -> list[subprocess.Popen[bytes]]:
    """Start the load as child processes (the caller kills them)."""
    n = max(1, math.ceil(cores))
    share = min(1.0, cores / n)
    argv = [sys.executable, "-m", "bench.cpu_load", "--child", str(share), str(nice)]
    return [subprocess.Popen(argv, cwd=os.path.dirname(os.path.dirname(__file__))) for _ in range(n)]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        os.nice(int(argv[2]))
        burn(float(argv[1]))
        return 0
    procs = start(float(argv[0]), int(argv[1]) if len(argv) > 1 else 10)
    try:
        for p in procs:
            p.wait()
    finally:
        for p in procs:
            p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
