"""Statistics over repetitions and the markdown report."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime


@dataclass
class Series:
    """One measured quantity, one value per repetition."""

    key: str
    label: str
    unit: str
    values: list[float] = field(default_factory=list)
    goal: str = ""                      # e.g. ">= 0.9", "<= 50"
    fmt: str = "{:.2f}"

    def add(self, value: float | None) -> None:
        if value is not None:
            self.values.append(value)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def cell(self, value: float | None) -> str:
        return "-" if value is None else self.fmt.format(value)

    def verdict(self) -> str:
        if not self.goal or self.median is None:
            return ""
        m = re.fullmatch(r"\s*(>=|<=)\s*([0-9.]+)\s*", self.goal)
        if not m:
            return ""
        op, bound = m[1], float(m[2])
        ok = self.median >= bound if op == ">=" else self.median <= bound
        return "met" if ok else "**not met**"

    def row(self) -> list[str]:
        vals = self.values
        return [self.label, self.unit, self.goal or "", self.cell(self.median),
                self.cell(min(vals) if vals else None), self.cell(max(vals) if vals else None),
                str(len(vals)), self.verdict()]


HEADERS = ["measure", "unit", "goal", "median", "min", "max", "n", "verdict"]


def md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def text_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    rows = [[c.replace("**", "") for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return out


def _cmd(argv: list[str], pick: Callable[[str], str] = lambda s: s.splitlines()[0] if s else "?") -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return pick(out)


def machine_facts() -> dict[str, str]:
    def cpu_model() -> str:
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "?"

    try:
        mem = next(int(x.split()[1]) for x in open("/proc/meminfo") if x.startswith("MemTotal"))
        mem_s = f"{mem / (1 << 20):.0f} GiB"
    except (OSError, StopIteration, ValueError):
        mem_s = "?"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "memory": mem_s,
        "kernel": platform.release(),
        "qemu": _cmd(["qemu-system-x86_64", "--version"]),
        "qemu-img": _cmd(["qemu-img", "--version"]),
        "libvirt": _cmd(["libvirtd", "--version"]),
        "virtnbdbackup": _cmd(["virtnbdbackup", "--version"], lambda s: s or "?"),
        "python": platform.python_version(),
        "code": code_state(),
    }


def code_state() -> str:
    """The commit measured, and whether the work tree had changes (other work in flight)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = _cmd(["git", "-C", repo, "log", "-1", "--format=%h %s"])
    dirty = _cmd(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"], lambda s: s)
    return f"`{head}`" + (" plus uncommitted changes in the work tree" if dirty.strip() else "")


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
