"""The four replication benchmarks, measured side by side in one lab.

Every repetition measures each contender once, in a rotating order, so slow
phases of a shared machine spread over all of them; the report compares
ratios within a repetition, never absolute times across runs.

virtsync runs in two link modes when the lab supports TLS: ``tls`` (the
default, as shipped: PSK TLS on NBD) and ``plain`` (``insecure_plain = true``
on both agents). The agents are restarted with the other config between the
two; the full set of benchmarks runs in the first mode of the lab (``tls``),
the data-path ones (initial copy, incremental, idle cycle) in both.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.lab import procs
from tests.lab.agent import LabAgent

from . import cpu_load
from .lab import (
    VNB_DOMAIN,
    VS_DOMAIN,
    BenchLab,
    Extent,
    GiB,
    MiB,
    child_pids,
    children_cpu,
    covered_bytes,
    cpu_seconds,
    dirty_plan,
    run,
)
from .report import Series

CONVERT_PORT = 10811
QSD = shutil.which("qemu-storage-daemon") or "/usr/bin/qemu-storage-daemon"
REPO = Path(__file__).resolve().parents[1]
MODE_LABEL = {"tls": "TLS", "plain": "plain NBD"}


def lab_supports_tls() -> bool:
    """True when the lab agents take ``tls=`` (the agent has TLS on its links)."""
    return "tls" in inspect.signature(LabAgent.__init__).parameters


@dataclass(frozen=True)
class WriterProfile:
    """A guest-like writer: queue depth 1, one request per HMP qemu-io call."""

    name: str
    block: int
    region: int          # bytes at the start of the disk that it writes
    sequential: bool     # sequential over the region, else scattered (multiplicative hash)

    def describe(self) -> str:
        how = "sequential, wrapping" if self.sequential else "scattered"
        return f"{self.block // 1024} KiB writes, {how}, over the first {self.region // MiB} MiB"

    def offsets(self) -> Callable[[int], int]:
        slots = self.region // self.block
        if self.sequential:
            return lambda i: (i % slots) * self.block
        # Knuth's multiplicative hash (odd constant): a permutation-like spread.
        return lambda i: ((i * 2654435761) % slots) * self.block


PROFILES = {
    "hot": lambda size: WriterProfile("hot", 1 * MiB, min(128 * MiB, size), True),
    "scattered": lambda size: WriterProfile("scattered", 256 * 1024, size, False),
}


class Bench:
    """Runs the repetitions and fills :attr:`series`."""

    def __init__(self, lab: BenchLab, *, reps: int, window: float, dirty: float, idle_marks: int, write_rounds: int,
                 cli_marks: int, profiles: list[str], vnb: bool, modes: list[str],
                 log: Callable[[str], None] = print) -> None:
        self.lab = lab
        self.reps = reps
        self.window = window
        self.dirty = dirty
        self.idle_marks = idle_marks
        self.write_rounds = write_rounds
        self.cli_marks = cli_marks
        self.profiles = [PROFILES[p](lab.size) for p in profiles]
        self.vnb = vnb
        self.modes = modes
        self.main_mode = modes[0]
        # The lab's agents start as LabAgent makes them: TLS whenever it can.
        self.mode = "tls" if lab_supports_tls() else "plain"
        self.log = log
        self.notes: list[str] = []
        self._configs: dict[str, str] = {}
        self._m: dict[str, float] = {}          # this repetition's measurements
        self._off: dict[str, list[float]] = {}  # this repetition's unprotected writer windows
        size_mib = lab.size // MiB
        s: dict[str, Series] = {}

        def add(key: str, label: str, unit: str, goal: str = "", fmt: str = "{:.2f}") -> None:
            s[key] = Series(key, label, unit, goal=goal, fmt=fmt)

        tls = "tls" in modes
        # Ratios (the goals).
        for m in modes:
            conv = "qemu-img convert with TLS" if m == "tls" else "qemu-img convert, plain"
            add(f"r_full_convert_{m}", f"1. initial copy {size_mib} MiB, {MODE_LABEL[m]}: virtsync speed / "
                f"{conv} speed", "x", ">= 0.9")
        for m in modes:
            add(f"r_full_vnb_{m}", f"1. initial copy, {MODE_LABEL[m]}: virtsync speed / virtnbdbackup full speed", "x")
        for m in modes:
            add(f"r_inc_vnb_{m}", f"2. incremental ({dirty:.0%} dirty), {MODE_LABEL[m]}: virtnbdbackup inc time "
                "/ virtsync cycle time", "x", ">= 1.5")
            add(f"r_inc_vnb_wall_{m}", f"2. the same, {MODE_LABEL[m]}, virtsync timed by the `mark` reply", "x")
        for p in self.profiles:
            add(f"r_write_{p.name}", f"3. guest writes ({p.name}), {MODE_LABEL[self.main_mode]}: throughput "
                "protected (cycles running) / unprotected", "x", ">= 0.97", fmt="{:.3f}")
            add(f"r_write_susp_{p.name}", f"3. the same ({p.name}), protected but no cycle running (dirty bitmap "
                "only) / unprotected", "x", fmt="{:.3f}")
            add(f"r_write_adj_{p.name}", f"3. the same ({p.name}): cycles running / dirty bitmap only, adjacent "
                "windows (same cache state: the unbiased view)", "x", ">= 0.97", fmt="{:.3f}")
            add(f"r_write_load_both_{p.name}", f"3. calibration ({p.name}): a synthetic CPU load (no I/O, nice 10, "
                "10 ms bursts) as large as both sites' virtsync processes used in the cycles window / dirty bitmap "
                "only", "x", fmt="{:.3f}")
            add(f"r_write_load_pri_{p.name}", f"3. calibration ({p.name}): the same with the primary site's share "
                "only (the secondary on its own host) / dirty bitmap only", "x", fmt="{:.3f}")
        for m in modes:
            add(f"idle_cycle_ms_{m}", f"4. idle cycle, {MODE_LABEL[m]}: agent's cycle record", "ms", "<= 50",
                fmt="{:.0f}")
            add(f"idle_ipc_ms_{m}", f"4. idle cycle, {MODE_LABEL[m]}: `mark` request wall (IPC)", "ms", "<= 50",
                fmt="{:.0f}")
        add("idle_cli_ms", f"4. idle cycle, {MODE_LABEL[self.main_mode]}: `virtsync mark --wait` CLI wall "
            "(python start included)", "ms", fmt="{:.0f}")
        # Absolute figures behind the ratios.
        for m in modes:
            add(f"vs_full_s_{m}", f"virtsync ({MODE_LABEL[m]}) initial copy: full cycle record", "s")
            add(f"vs_protect_s_{m}", f"virtsync ({MODE_LABEL[m]}) `protect --wait` wall", "s")
        add("convert_s_plain", "qemu-img convert -> NBD export on qemu-storage-daemon, plain", "s")
        if tls:
            add("convert_s_tls", "qemu-img convert -> the same with TLS (PSK)", "s")
        add("vnb_full_s", "virtnbdbackup -l full (wall)", "s")
        for m in modes:
            add(f"vs_full_mibs_{m}", f"virtsync ({MODE_LABEL[m]}) initial copy rate", "MiB/s", fmt="{:.0f}")
        add("convert_mibs_plain", "qemu-img convert rate, plain", "MiB/s", fmt="{:.0f}")
        if tls:
            add("convert_mibs_tls", "qemu-img convert rate, TLS", "MiB/s", fmt="{:.0f}")
        add("vnb_full_mibs", "virtnbdbackup full rate", "MiB/s", fmt="{:.0f}")
        for m in modes:
            add(f"cpu_vs_full_{m}", f"CPU per GiB, initial copy: virtsync ({MODE_LABEL[m]}; guest QEMU + agents + "
                "their qemu-img + secondary qsd)", "s/GiB")
        add("cpu_convert_plain", "CPU per GiB, initial copy: qemu-img convert + target qsd, plain", "s/GiB")
        if tls:
            add("cpu_convert_tls", "CPU per GiB, initial copy: qemu-img convert + target qsd, TLS", "s/GiB")
        add("cpu_vnb_full", "CPU per GiB, initial copy: virtnbdbackup + guest QEMU", "s/GiB")
        for m in modes:
            add(f"vs_inc_s_{m}", f"virtsync ({MODE_LABEL[m]}) incremental: cycle record", "s", fmt="{:.3f}")
            add(f"vs_inc_wall_s_{m}", f"virtsync ({MODE_LABEL[m]}) incremental: `mark` wall", "s", fmt="{:.3f}")
            add(f"cpu_vs_inc_{m}", f"CPU per incremental: virtsync ({MODE_LABEL[m]})", "s")
        add("vnb_inc_s", "virtnbdbackup -l inc (wall)", "s", fmt="{:.3f}")
        add("cpu_vnb_inc", "CPU per incremental: virtnbdbackup + guest QEMU", "s")
        add("inc_mib", "incremental payload (virtsync marker bytes)", "MiB", fmt="{:.1f}")
        for p in self.profiles:
            add(f"w_off_{p.name}", f"writer {p.name}: unprotected (mean of a window before and after)", "MiB/s",
                fmt="{:.0f}")
            add(f"w_susp_{p.name}", f"writer {p.name}: protected but suspended (bitmap only, no cycle)", "MiB/s",
                fmt="{:.0f}")
            add(f"w_on_{p.name}", f"writer {p.name}: protected, cycles back to back every ~1 s", "MiB/s",
                fmt="{:.0f}")
            add(f"w_cycles_{p.name}", f"writer {p.name}: cycles completed during the protected window", "",
                fmt="{:.0f}")
            add(f"w_sent_{p.name}", f"writer {p.name}: MiB sent by those cycles", "MiB", fmt="{:.0f}")
            add(f"w_cores_pri_{p.name}", f"writer {p.name}: cores used by the primary's agent and storage daemon "
                "during the cycles window", "cores")
            add(f"w_cores_sec_{p.name}", f"writer {p.name}: cores used by the secondary's agent (with its qemu-img) "
                "and storage daemon", "cores")
            add(f"w_load_both_{p.name}", f"writer {p.name}: beside a synthetic load of both sites' cores", "MiB/s",
                fmt="{:.0f}")
            add(f"w_load_pri_{p.name}", f"writer {p.name}: beside a synthetic load of the primary's cores", "MiB/s",
                fmt="{:.0f}")
        self.series = s

    # -- helpers -----------------------------------------------------------------

    @property
    def pri(self) -> Any:
        return self.lab.agents["pri"]

    def _add(self, key: str, value: float) -> None:
        self.series[key].add(value)
        self._m[key] = value

    def _cycle_after(self, row_id: int) -> Any:
        rows = self.lab.cycles(1)
        if not rows or rows[0]["id"] <= row_id or rows[0]["finished"] is None or rows[0]["error"]:
            raise RuntimeError(f"no finished cycle record after id {row_id}: {[dict(r) for r in rows]}")
        return rows[0]

    def _last_cycle_id(self) -> int:
        rows = self.lab.cycles(1)
        return int(rows[0]["id"]) if rows else 0

    def _vs_cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.lab.virtsync_pids())

    def set_mode(self, mode: str) -> None:
        """Restart both agents with TLS on or off (``insecure_plain`` on every peer)."""
        if mode == self.mode:
            return
        for name, agent in self.lab.agents.items():
            text = self._configs.setdefault(name, agent.config.read_text())
            if mode == "plain":
                text = re.sub(r'(\[peers\.[^\]\n]+\]\naddress = "[^"\n]+"\n)', r"\1insecure_plain = true\n", text)
            agent.config.write_text(text)
        for agent in self.lab.agents.values():
            agent.stop()
        for agent in self.lab.agents.values():
            agent.start()
        self.mode = mode
        self.log(f"  agents restarted: {MODE_LABEL[mode]}")

    # -- 1. initial copy -------------------------------------------------------

    def virtsync_full(self) -> None:
        m = self.mode
        before = self._last_cycle_id()
        c0 = self._vs_cpu()
        t0 = time.monotonic()
        # rpo=2: once resumed, the agent's own scheduler cycles every rpo/2 = 1 s.
        self.pri.call("protect", domain=VS_DOMAIN, to="sec", rpo=2, wait=True, timeout=900)
        wall = time.monotonic() - t0
        cpu = self._vs_cpu() - c0
        self.pri.call("suspend", domain=VS_DOMAIN, timeout=300)
        row = self._cycle_after(before)
        if row["kind"] != "full" or row["seq"] != 1:
            raise RuntimeError(f"expected the full first cycle, got {dict(row)}")
        cyc = row["finished"] - row["started"]
        self._add(f"vs_full_s_{m}", cyc)
        self._add(f"vs_protect_s_{m}", wall)
        self._add(f"vs_full_mibs_{m}", self.lab.size / MiB / cyc)
        self._add(f"cpu_vs_full_{m}", cpu * GiB / self.lab.size)
        self.log(f"  virtsync full ({MODE_LABEL[m]}): cycle {cyc:.2f}s, protect wall {wall:.2f}s, cpu {cpu:.2f}s")

    def convert_full(self, rep: int, tls: bool) -> None:
        """qemu-img convert from the same data into the same kind of target the
        secondary uses: a fresh qcow2 opened by qemu-storage-daemon (default
        file node options), exported writable over NBD on the sec host; with
        ``tls`` both ends use a PSK like the agents' NBD link."""
        m = "tls" if tls else "plain"
        work = self.lab.sec_storage / "bench-convert"
        work.mkdir(exist_ok=True)
        keys = work / "keys"
        if tls and not (keys / "keys.psk").exists():
            keys.mkdir(exist_ok=True)
            run(["psktool", "-u", "qemu", "-p", str(keys / "keys.psk")])
        target = work / f"t{rep}.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(self.lab.size)])
        qmp = work / "qsd.qmp"
        with contextlib.suppress(FileNotFoundError):
            qmp.unlink()
        server_tls = [",tls-creds=tls0", ["--object", f"tls-creds-psk,id=tls0,endpoint=server,dir={keys}"]] if tls \
            else ["", []]
        argv = ["ip", "netns", "exec", self.lab.sec.netns, QSD, *server_tls[1],
                "--blockdev", f"driver=file,node-name=vs-f,filename={target}",
                "--blockdev", "driver=qcow2,node-name=vs-p,file=vs-f",
                "--nbd-server", f"addr.type=inet,addr.host={self.lab.sec.address},addr.port={CONVERT_PORT}"
                + str(server_tls[0]),
                "--export", "type=nbd,id=vs-e,node-name=vs-p,name=bench,writable=on",
                # The monitor last: when its socket exists, the NBD server listens.
                "--chardev", f"socket,id=vs-mon,path={qmp},server=on,wait=off", "--monitor", "chardev=vs-mon"]
        proc = procs.spawn(argv, log_path=str(work / "qsd.log"))
        src = self.lab.work / "src.qcow2"  # type: ignore[operator]
        if tls:
            convert = ["qemu-img", "convert", "--object",
                       f"tls-creds-psk,id=tls0,endpoint=client,dir={keys},username=qemu",
                       "-n", "-T", "none", "-f", "qcow2", str(src), "--target-image-opts",
                       f"driver=nbd,host={self.lab.sec.address},port={CONVERT_PORT},export=bench,tls-creds=tls0"]
        else:
            convert = ["qemu-img", "convert", "-n", "-T", "none", "-f", "qcow2", str(src),
                       "-O", "raw", f"nbd://{self.lab.sec.address}:{CONVERT_PORT}/bench"]
        try:
            procs.wait_for_path(str(qmp), 10, proc)
            c0 = children_cpu() + cpu_seconds(proc.pid)
            t0 = time.monotonic()
            self.lab.pri.netns_run(convert, timeout=900)
            dt = time.monotonic() - t0
            cpu = children_cpu() + cpu_seconds(proc.pid) - c0
        finally:
            procs.end(proc, timeout=30)
            target.unlink(missing_ok=True)
        self._add(f"convert_s_{m}", dt)
        self._add(f"convert_mibs_{m}", self.lab.size / MiB / dt)
        self._add(f"cpu_convert_{m}", cpu * GiB / self.lab.size)
        self.log(f"  qemu-img convert ({MODE_LABEL[m]}): {dt:.2f}s, cpu {cpu:.2f}s")

    def _vnb(self, level: str) -> tuple[float, float]:
        out = self.lab.work / "vnb"  # type: ignore[operator]
        if level == "full":
            shutil.rmtree(out, ignore_errors=True)
            self._drop_checkpoints()
        argv = ["virtnbdbackup", "-U", self.lab.pri.uri, "-d", VNB_DOMAIN, "-l", level, "-o", str(out), "-n"]
        qemu = self.lab.qemu_pid(VNB_DOMAIN)
        c0 = children_cpu() + cpu_seconds(qemu)
        t0 = time.monotonic()
        res = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        dt = time.monotonic() - t0
        cpu = children_cpu() + cpu_seconds(qemu) - c0
        if res.returncode != 0:
            raise RuntimeError(f"virtnbdbackup -l {level} failed ({res.returncode}):\n{res.stderr[-2000:]}")
        return dt, cpu

    def _drop_checkpoints(self) -> None:
        names = self.lab.pri.virsh("checkpoint-list", VNB_DOMAIN, "--name", check=False).split()
        for name in reversed(names):
            self.lab.pri.virsh("checkpoint-delete", VNB_DOMAIN, name, check=False)

    def vnb_full(self) -> None:
        dt, cpu = self._vnb("full")
        self._add("vnb_full_s", dt)
        self._add("vnb_full_mibs", self.lab.size / MiB / dt)
        self._add("cpu_vnb_full", cpu * GiB / self.lab.size)
        self.log(f"  virtnbdbackup full: {dt:.2f}s, cpu {cpu:.2f}s")

    # -- 4. idle cycles ------------------------------------------------------------

    def idle(self, cli: bool) -> None:
        m = self.mode
        cyc_ms, ipc_ms, cli_ms = [], [], []
        for _ in range(self.idle_marks):
            before = self._last_cycle_id()
            t0 = time.monotonic()
            reply = self.pri.call("mark", domain=VS_DOMAIN)
            ipc_ms.append((time.monotonic() - t0) * 1000)
            row = self._cycle_after(before)
            cyc_ms.append((row["finished"] - row["started"]) * 1000)
            if sum(reply["bytes"].values()):
                self.notes.append(f"an idle mark sent {reply['bytes']} (the idle guest wrote?)")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        for _ in range(self.cli_marks if cli else 0):
            t0 = time.monotonic()
            res = subprocess.run([sys.executable, "-m", "plugin.cli", "--socket", self.pri.socket, "mark", "--wait",
                                  VS_DOMAIN], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
            cli_ms.append((time.monotonic() - t0) * 1000)
            if res.returncode != 0:
                raise RuntimeError(f"virtsync mark failed: {res.stderr.strip()}")
        # One value per repetition: the median of its marks.
        self._add(f"idle_cycle_ms_{m}", statistics.median(cyc_ms))
        self._add(f"idle_ipc_ms_{m}", statistics.median(ipc_ms))
        if cli_ms:
            self._add("idle_cli_ms", statistics.median(cli_ms))
        self.log(f"  idle marks ({MODE_LABEL[m]}): cycle {[round(x) for x in cyc_ms]} ms, "
                 f"ipc {[round(x) for x in ipc_ms]} ms, cli {[round(x) for x in cli_ms]} ms")

    # -- 2. incremental ------------------------------------------------------------

    def write_plan(self, rep: int, names: list[str]) -> list[Extent]:
        """Dirty the same scattered extents of each named guest (a new plan per call)."""
        plan = dirty_plan(self.lab.size, self.dirty, seed=1000 + 10 * rep + len(names))
        for name in names:
            self.lab.guests[name].write_extents(plan, 0x40 + rep)
        return plan

    def virtsync_inc(self, plan: list[Extent]) -> None:
        m = self.mode
        before = self._last_cycle_id()
        c0 = self._vs_cpu()
        t0 = time.monotonic()
        reply = self.pri.call("mark", domain=VS_DOMAIN, label="bench-inc", timeout=300)
        wall = time.monotonic() - t0
        cpu = self._vs_cpu() - c0
        row = self._cycle_after(before)
        cyc = row["finished"] - row["started"]
        sent = sum(reply["bytes"].values())
        planned = covered_bytes(plan)
        if sent != planned:
            self.notes.append(f"incremental marker ({MODE_LABEL[m]}) sent {sent} bytes, the plan dirtied {planned}")
        self._add(f"vs_inc_s_{m}", cyc)
        self._add(f"vs_inc_wall_s_{m}", wall)
        self._add(f"cpu_vs_inc_{m}", cpu)
        if m == self.main_mode:
            self._add("inc_mib", sent / MiB)
        self.log(f"  virtsync incremental ({MODE_LABEL[m]}): {sent / MiB:.1f} MiB, cycle {cyc:.3f}s, "
                 f"mark wall {wall:.3f}s, cpu {cpu:.2f}s")

    def vnb_inc(self) -> None:
        dt, cpu = self._vnb("inc")
        self._add("vnb_inc_s", dt)
        self._add("cpu_vnb_inc", cpu)
        self.log(f"  virtnbdbackup inc: {dt:.3f}s, cpu {cpu:.2f}s")

    # -- 3. guest writes -------------------------------------------------------------

    def write_window(self, profile: WriterProfile, pattern: int) -> float:
        """MiB/s of a guest-like writer during ``window`` seconds."""
        guest = self.lab.guests[VS_DOMAIN]  # its second monitor takes one client: reuse it
        offset = profile.offsets()
        guest.qemu_io(f"write -P {pattern:#04x} 0 {profile.block}")  # warm up the connection
        n = 0
        t0 = time.monotonic()
        end = t0 + self.window
        while time.monotonic() < end:
            guest.qemu_io(f"write -P {pattern:#04x} {offset(n)} {profile.block}")
            n += 1
        dt = time.monotonic() - t0
        return n * profile.block / MiB / dt

    def _cpu_by_process(self) -> dict[str, float]:
        """CPU seconds so far of each process on the writer's machine (both lab hosts share it)."""
        out = {"guest QEMU": cpu_seconds(self.lab.qemu_pid(VS_DOMAIN)), "bench writer": cpu_seconds(os.getpid())}
        for name, agent in self.lab.agents.items():
            if agent.proc is not None:
                out[f"{name} agent"] = cpu_seconds(agent.proc.pid)
                out[f"{name} qsd"] = sum(cpu_seconds(p) for p in child_pids(agent.proc.pid, "qemu-storage-d"))
        return out

    def _cpu_window(self, before: dict[str, float], seconds: float, after: dict[str, float] | None = None) -> str:
        after = after if after is not None else self._cpu_by_process()
        return ", ".join(f"{k} {(after[k] - v) / seconds:.2f}" for k, v in before.items() if k in after)

    def writes_warm_up(self) -> None:
        """One window per profile that counts for nothing: the first window after the
        lab starts ran ~30 % slower than the same window a minute later (cold caches)."""
        for p in self.profiles:
            rate = self.write_window(p, 0x40)
            self.log(f"  writer warm-up {p.name}: {rate:.0f} MiB/s (not counted)")

    def writes_off(self, rep: int) -> None:
        """Unprotected windows, at the start and at the end of the repetition's main
        block: their mean is the baseline, so a load change during the block is shared."""
        out = {}
        for p in self.profiles:
            cpu = self._cpu_by_process()
            out[p.name] = self.write_window(p, 0x60 + rep)
            self.log(f"  CPU (cores) during the unprotected {p.name} window: {self._cpu_window(cpu, self.window)}")
            self._off.setdefault(p.name, []).append(out[p.name])
        self.log("  writer unprotected: " + ", ".join(f"{k} {v:.0f} MiB/s" for k, v in out.items()))

    def writes_on(self, rep: int) -> None:
        """``write_rounds`` rounds per profile, each a bitmap-only window, then a
        window with cycles running, then the calibration windows; every ratio is
        taken within its round, against that round's bitmap-only window (windows
        5 s apart on a shared machine drift by ±20 %: one pair per repetition
        cannot resolve a 3 % goal)."""
        for p in self.profiles:
            susp_rates, on_rates = [], []
            for rnd in range(self.write_rounds):
                pattern = (rep * self.write_rounds + rnd) % 16
                # Protected but suspended: the dirty bitmap records, no cycle runs.
                susp = self.write_window(p, 0x50 + pattern)
                self._add(f"w_susp_{p.name}", susp)
                self.log(f"  writer protected, suspended {p.name}: {susp:.0f} MiB/s")
                on, used = self._cycles_window(p, 0x70 + pattern)
                self.series[f"r_write_adj_{p.name}"].add(on / susp)
                for key, rate in self._calibrate(p, pattern, used).items():
                    self.series[f"r_write_load_{key}_{p.name}"].add(rate / susp)
                susp_rates.append(susp)
                on_rates.append(on)
            self._m[f"w_susp_mean_{p.name}"] = statistics.mean(susp_rates)
            self._m[f"w_on_mean_{p.name}"] = statistics.mean(on_rates)

    def _cycles_window(self, p: WriterProfile, pattern: int) -> tuple[float, dict[str, float]]:
        """One writer window while the agent runs cycles back to back; its rate
        and the cores each site's virtsync processes used meanwhile."""
        # Send what the window before dirtied first: this one starts from a clean bitmap.
        self.pri.call("mark", domain=VS_DOMAIN, label="bench-sync", timeout=300)
        before = self._last_cycle_id()
        self.pri.call("resume", domain=VS_DOMAIN)
        cpu = self._cpu_by_process()
        try:
            rate = self.write_window(p, pattern)
        finally:
            after = self._cpu_by_process()
            self.log(f"  CPU (cores) during the protected {p.name} window: {self._cpu_window(cpu, self.window, after)}")
            used = self._site_cores(cpu, after)
            self.pri.call("suspend", domain=VS_DOMAIN, timeout=300)
        rows = [r for r in self.lab.cycles(200) if r["id"] > before]
        done = [r for r in rows if r["finished"] and not r["error"]]
        failed = [r for r in rows if r["error"]]
        if failed:
            self.notes.append(f"writer {p.name}: {len(failed)} cycles failed: {failed[0]['error'][:200]}")
        self._add(f"w_on_{p.name}", rate)
        self._add(f"w_cycles_{p.name}", len(done))
        self._add(f"w_sent_{p.name}", sum(r["bytes"] for r in done) / MiB)
        self.log(f"  writer protected {p.name}: {rate:.0f} MiB/s, {len(done)} cycles, "
                 f"{sum(r['bytes'] for r in done) / MiB:.0f} MiB sent")
        return rate, used

    def _site_cores(self, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """Cores each site's virtsync processes (agent, its children, storage daemon) used in the window."""
        return {site: sum(after[k] - before[k] for k in (f"{site} agent", f"{site} qsd") if k in after and k in before)
                / self.window for site in ("pri", "sec")}

    def _calibrate(self, p: WriterProfile, pattern: int, used: dict[str, float]) -> dict[str, float]:
        """The writer beside a synthetic CPU load (``bench.cpu_load``) as large as what
        virtsync's processes used in the protected window: once both sites' share, once
        the primary's only (what the guest's host would carry with the secondary on its
        own host). No I/O, nothing of virtsync: the machine's price for that much CPU."""
        self._add(f"w_cores_pri_{p.name}", used["pri"])
        self._add(f"w_cores_sec_{p.name}", used["sec"])
        rates = {}
        for key, cores in (("both", used["pri"] + used["sec"]), ("pri", used["pri"])):
            load = cpu_load.start(cores)
            try:
                rate = self.write_window(p, 0x30 + pattern)
            finally:
                for proc in load:
                    proc.kill()
                    proc.wait()
            self._add(f"w_load_{key}_{p.name}", rate)
            rates[key] = rate
            self.log(f"  writer {p.name} beside a synthetic load of {cores:.2f} cores ({key}): {rate:.0f} MiB/s")
        return rates

    # -- one repetition ---------------------------------------------------------------

    def main_block(self, rep: int) -> None:
        """Everything, in the lab's main mode."""
        self._off = {}
        if rep == 0:
            self.writes_warm_up()
        self.writes_off(rep)
        fulls: list[Callable[[], None]] = [self.virtsync_full, lambda: self.convert_full(rep, tls=False)]
        if "tls" in self.modes:
            fulls.append(lambda: self.convert_full(rep, tls=True))
        if self.vnb:
            fulls.append(self.vnb_full)
        k = rep % len(fulls)
        for step in fulls[k:] + fulls[:k]:
            step()
        self.idle(cli=True)
        plan = self.write_plan(rep, [VS_DOMAIN] + ([VNB_DOMAIN] if self.vnb else []))
        incs: list[Callable[[], None]] = [lambda: self.virtsync_inc(plan)]
        if self.vnb:
            incs.append(self.vnb_inc)
        if rep % 2:
            incs.reverse()
        for step in incs:
            step()
        self.writes_on(rep)
        self.pri.call("unprotect", domain=VS_DOMAIN, timeout=300)
        self.writes_off(rep)
        for p in self.profiles:
            self._add(f"w_off_{p.name}", statistics.mean(self._off[p.name]))

    def other_block(self, rep: int) -> None:
        """The data-path benchmarks in another mode."""
        self.virtsync_full()
        self.idle(cli=False)
        plan = self.write_plan(rep, [VS_DOMAIN])
        self.virtsync_inc(plan)
        self.pri.call("unprotect", domain=VS_DOMAIN, timeout=300)

    def repetition(self, rep: int) -> None:
        self.log(f"repetition {rep + 1}/{self.reps}")
        self._m = {}
        # Keep the agents' current mode first: one restart per repetition.
        order = sorted(self.modes, key=lambda m: m != self.mode)
        for mode in order:
            self.set_mode(mode)
            if mode == self.main_mode:
                self.main_block(rep)
            else:
                self.other_block(rep)
        m, s = self._m, self.series
        for mode in self.modes:
            full = m[f"vs_full_s_{mode}"]
            conv = m.get(f"convert_s_{mode}")
            if conv:
                s[f"r_full_convert_{mode}"].add(conv / full)
            if self.vnb:
                s[f"r_full_vnb_{mode}"].add(m["vnb_full_s"] / full)
                s[f"r_inc_vnb_{mode}"].add(m["vnb_inc_s"] / m[f"vs_inc_s_{mode}"])
                s[f"r_inc_vnb_wall_{mode}"].add(m["vnb_inc_s"] / m[f"vs_inc_wall_s_{mode}"])
        for p in self.profiles:
            s[f"r_write_{p.name}"].add(m[f"w_on_mean_{p.name}"] / m[f"w_off_{p.name}"])
            s[f"r_write_susp_{p.name}"].add(m[f"w_susp_mean_{p.name}"] / m[f"w_off_{p.name}"])

    def run(self) -> None:
        for rep in range(self.reps):
            self.repetition(rep)
