"""The one place the CLI writes to the user: text helpers, tables, progress, a result as
text or ``--json``, and the one-line error with its exit code (DESIGN.md §3)."""

from __future__ import annotations

import json
import math
import sys
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

#: Error lines are cut here, so a huge argument cannot flood the terminal.
MAX_ERROR_LINE = 400


def one_line(text: str, limit: int = MAX_ERROR_LINE) -> str:
    """Escape control characters (and lone surrogates from undecodable argv) and cut to ``limit``."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                  for c in text)
    return out if len(out) <= limit else out[:limit - 3] + "..."


def _shown(value: str) -> str:
    """A user value quoted for an error message, short enough to read."""
    return f"'{one_line(value, 40)}'"


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def human_bytes(value: object) -> str:
    """1536 -> '1.5 KiB'; anything not a number -> '-'."""
    n = _number(value)
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "PiB":
            break
    return f"{n:.1f} {unit}"


def human_rate(value: object) -> str:
    return "-" if _number(value) is None else human_bytes(value) + "/s"


def human_duration(value: object) -> str:
    """3.4 -> '3.4 s', 754 -> '12m34s', 7300 -> '2h01m', 200000 -> '2d07h'."""
    s = _number(value)
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    whole = int(s)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return one_line(str(value), 80)


def _time(value: object) -> str:
    t = _number(value)
    if t is None:
        return "-"
    try:
        return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Left-aligned columns, two spaces apart; the last column is not padded."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _dicts(value: object) -> list[dict[str, Any]]:
    """The dict items of a list from the daemon; anything else is dropped rather than crashing."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _field(result: object, key: str) -> object:
    return result.get(key) if isinstance(result, dict) else None


class ProgressRenderer:
    """Progress items ``{"target", "bytes_done", "bytes_total", "rate_bps"}`` on stderr.

    On a terminal one line is redrawn in place; in a log or pipe a line is written per
    target each time it passes another 10 %, so logs stay short.
    """

    BAR = 20

    def __init__(self, stream: TextIO, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._deciles: dict[str, int] = {}
        self._line_open = False

    def __call__(self, item: object) -> None:
        # The stream's last item is the final result, repeated as progress (ipc.py): skip it.
        if not isinstance(item, dict) or "bytes_done" not in item:
            return
        target = _cell(item.get("target"))
        done = _number(item.get("bytes_done")) or 0.0
        total = _number(item.get("bytes_total")) or 0.0
        fraction = min(max(done / total, 0.0), 1.0) if total > 0 else None
        if fraction is None:
            text = f"{target}: {human_bytes(done)} {human_rate(item.get('rate_bps'))}"
        else:
            filled = int(fraction * self.BAR)
            bar = "#" * filled + "." * (self.BAR - filled)
            text = (f"{target}: [{bar}] {fraction * 100:5.1f}% {human_bytes(done)} / {human_bytes(total)} "
                    f"{human_rate(item.get('rate_bps'))}")
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")   # carriage return, then clear the old tail
            self._line_open = True
        else:
            decile = int(fraction * 10) if fraction is not None else 0
            if target in self._deciles and decile <= self._deciles[target]:
                return
            self._deciles[target] = decile
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False


def print_result(result: object, lines: Sequence[str], as_json: bool, limit: int | None = None) -> None:
    """``--json``: the result as stable JSON; otherwise the rendered lines (cut by one_line
    when ``limit`` is given)."""
    if as_json:
        print(json.dumps(result, sort_keys=True, indent=2))
    else:
        for line in lines:
            print(line if limit is None else one_line(line, limit))


def error_name(exc: BaseException) -> str:
    return str(getattr(exc, "type_name", "") or type(exc).__name__)


def report_error(exc: BaseException, exit_code: int, debug: bool) -> int:
    """``TypeName: message`` on stderr (the traceback too with --debug); return ``exit_code``."""
    if debug:
        traceback.print_exc()
    text = one_line(str(exc))
    print(f"{error_name(exc)}: {text}" if text else error_name(exc), file=sys.stderr)
    return exit_code


def report_bug(exc: BaseException, debug: bool) -> int:
    """An exception virtsync did not raise on purpose: name it as a bug, exit 1."""
    if debug:
        traceback.print_exc()
    print(f"{type(exc).__name__}: {one_line(str(exc))} (a bug in virtsync; --debug shows where)", file=sys.stderr)
    return 1
