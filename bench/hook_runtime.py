"""``python -m bench.hook_runtime``: how long the libvirt hook keeps libvirt waiting.

libvirt runs its hooks synchronously and without a timeout, so the hook's wall time is
added to every domain start, stop and migration. This installs ``hooks/qemu`` into a
temporary directory and runs it ``--runs`` times the way libvirtd does (argv, the domain XML
written to a stdin pipe the hook never reads, stdout and stderr captured, only ``LC_ALL``,
``PATH`` and ``HOME`` in the environment), in three settings:

- *agent up*: the real :func:`plugin.ipc.serve`, in its own process, answers ``hook`` at once
  (goal: p99 <= 50 ms);
- *agent down*: no socket, so the hook appends to the spool (flock, write, fsync x2);
- baselines: ``python -IS -c pass`` (the interpreter's own start) and ``/bin/true``.

The settings take turns run by run, so a busy moment of a shared machine hits all alike.
Needs no root and no libvirt. Prints p50/p90/p99/max in milliseconds and the load average:
the figures are only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plugin import hook, ipc
from plugin.errors import PluginError

GOAL_P99_MS = 50.0
ENV = {"LC_ALL": "C", "PATH": "/usr/bin:/bin", "HOME": "/root"}


def domain_xml(kib: int) -> bytes:
    """A domain XML of about ``kib`` KiB (a typical one is 5-10 KiB)."""
    head = b"<domain type='kvm'><name>bench</name><description>"
    tail = b"</description></domain>\n"
    return head + b"x" * max(kib * 1024 - len(head) - len(tail), 0) + tail


def percentile(sorted_ms: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    index = max(min(int(round(q / 100 * len(sorted_ms) + 0.5)) - 1, len(sorted_ms) - 1), 0)
    return sorted_ms[index]


def run_once(argv: list[str], xml: bytes) -> float:
    """Wall time in ms of one run of ``argv`` as libvirt runs a hook; it must exit 0 silently."""
    started = time.perf_counter()
    res = subprocess.run(argv, input=xml, capture_output=True, env=ENV, cwd="/")
    elapsed = (time.perf_counter() - started) * 1000
    if res.returncode != 0 or res.stdout:
        raise RuntimeError(f"{argv[0]} exited {res.returncode} with stdout {res.stdout[:200]!r}, "
                           f"stderr {res.stderr[:200]!r}")
    return elapsed


def serve(path: str) -> None:
    """The agent stand-in (its own process, as the daemon is): :func:`plugin.ipc.serve` answering
    ``hook`` with null at once, until SIGTERM."""
    async def handler(op: str, args: dict[str, Any]) -> object:
        if op != "hook":
            raise ipc.UnknownOperationError(f"unknown operation {op!r}")
        return None

    async def main() -> None:
        await ipc.serve(path, handler)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    asyncio.run(main())


@contextmanager
def agent(path: str) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.hook_runtime", "--serve", path],
                            cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                ipc.request(path, "hook", {"domain": "-", "op": "-"}, timeout=1)
                break
            except PluginError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the agent stand-in did not start") from None
                time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def row(name: str, ms: Sequence[float]) -> str:
    ms = sorted(ms)
    return (f"{name:<34} {len(ms):>5} {percentile(ms, 50):>8.1f} {percentile(ms, 90):>8.1f} "
            f"{percentile(ms, 99):>8.1f} {ms[-1]:>8.1f} {statistics.fmean(ms):>8.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hook_runtime", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200, help="runs per setting (default 200)")
    p.add_argument("--xml-kib", type=int, default=8, help="size of the domain XML on stdin (default 8 KiB)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured rounds first (page cache)")
    p.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if args.runs < 1:
        p.error("--runs must be at least 1")
    xml = domain_xml(args.xml_kib)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="vs-hookbench-", dir="/tmp") as tmp:
        base = Path(tmp)
        sock = str(base / "a.sock")
        spool_up, spool_down = str(base / "up" / hook.SPOOL_NAME), str(base / "down" / hook.SPOOL_NAME)
        up_hook = hook.install(str(base / "up"), socket_path=sock, spool=spool_up)
        down_hook = hook.install(str(base / "down"), socket_path=str(base / "nobody.sock"), spool=spool_down)
        settings = {
            "agent up (ipc.serve answers)": [str(up_hook), "bench", "started", "begin", "-"],
            "agent down (spool + fsync)": [str(down_hook), "bench", "started", "begin", "-"],
            "baseline: python -IS -c pass": [sys.executable, "-IS", "-c", "pass"],
            "baseline: /bin/true": ["/bin/true"],
        }
        times: dict[str, list[float]] = {name: [] for name in settings}
        with agent(sock):
            # Round-robin, so a busy moment of a shared machine hits every setting alike.
            for i in range(args.warmup + args.runs):
                for name, cmd in settings.items():
                    elapsed = run_once(cmd, xml)
                    if i >= args.warmup:
                        times[name].append(elapsed)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(spool_down)   # every run appends to a fresh spool
        if os.path.exists(spool_up):
            raise RuntimeError(f"agent up, yet the hook spooled: {Path(spool_up).read_text()[:300]}")
    load_after = os.getloadavg()

    print(f"hook runtime, {args.runs} runs each (round-robin), {len(xml)} bytes of XML on stdin, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"{'setting':<34} {'runs':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}")
    for name, ms in times.items():
        print(row(name, ms))
    up, python = sorted(times["agent up (ipc.serve answers)"]), sorted(times["baseline: python -IS -c pass"])
    p99 = percentile(up, 99)
    verdict = "meets" if p99 <= GOAL_P99_MS else "misses"
    print(f"agent up p99 {p99:.1f} ms {verdict} the goal of {GOAL_P99_MS:.0f} ms; "
          f"the hook over a bare interpreter: p50 {percentile(up, 50) - percentile(python, 50):+.1f} ms")
    print("load average before " + " ".join(f"{x:.2f}" for x in load_before)
          + ", after " + " ".join(f"{x:.2f}" for x in load_after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
