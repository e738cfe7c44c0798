"""``virtsync``: the command-line front end. It talks to the daemon over :mod:`plugin.ipc`
(``hook`` and ``keys`` work on local files instead, without the daemon).

Every subcommand validates its arguments before anything is sent (bad usage: one line on
stderr, exit 2), sends one request named like the subcommand, and prints the result as a
table or, with ``--json``, as stable JSON. Errors print ``TypeName: message`` and exit with
the error's ``exit_code`` (DESIGN.md §3): 0 ok, 1 failed, 2 bad usage or config, 130 on ^C.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import tomllib
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, NoReturn, TextIO

from plugin import ipc
from plugin.errors import ConfigError, PluginError

__all__ = ["COMMANDS", "Command", "ProgressRenderer", "main"]

DEFAULT_CONFIG = "/etc/virtsync/virtsync.toml"
DEFAULT_SOCKET = "/run/virtsync/agent.sock"
#: Per-line timeout of a request (ipc.call bounds each wait for a reply line, progress included).
REQUEST_TIMEOUT = 30.0
#: The same with --wait: the daemon bounds its own waits (cycle timeout), so this is only a backstop
#: against a hung daemon; ^C ends the wait earlier.
WAIT_TIMEOUT = 3600.0
MAX_RPO = 7 * 86400          # Protection.rpo's upper bound
MAX_NAME = 255               # libvirt domain names: keep them file-name sized
MAX_LABEL = 128
#: Error lines are cut here, so a huge argument cannot flood the terminal.
MAX_ERROR_LINE = 400

log = logging.getLogger("virtsync.cli")


# ----------------------------------------------------------------------------- text helpers

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


# ----------------------------------------------------------------------------- argument types

def _name(what: str) -> Callable[[str], str]:
    """Validator for domain, peer and segment names."""
    def check(value: str) -> str:
        if not value:
            raise argparse.ArgumentTypeError(f"{what} name must not be empty")
        if len(value) > MAX_NAME:
            raise argparse.ArgumentTypeError(f"{what} name is too long ({len(value)} characters, at most {MAX_NAME})")
        if not value.isprintable():
            raise argparse.ArgumentTypeError(f"{what} name {_shown(value)} contains control or undecodable characters")
        if "/" in value:
            raise argparse.ArgumentTypeError(f"{what} name {_shown(value)} must not contain '/'")
        return value
    check.__name__ = f"{what} name"
    return check


def _rpo(value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,7}", value) or not 1 <= int(value) <= MAX_RPO:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds from 1 to {MAX_RPO}, not {_shown(value)}")
    return int(value)


def _label(value: str) -> str:
    if len(value) > MAX_LABEL:
        raise argparse.ArgumentTypeError(f"label is too long ({len(value)} characters, at most {MAX_LABEL})")
    if not value.isprintable():
        raise argparse.ArgumentTypeError(f"label {_shown(value)} contains control or undecodable characters")
    return value


def _path(value: str) -> str:
    if not value or "\0" in value:
        raise argparse.ArgumentTypeError("must be a non-empty path")
    return value


# ----------------------------------------------------------------------------- parser

class _UsageError(Exception):
    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _ParserExitError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of calling sys.exit, so main() returns the code."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.prog, message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._print_message(message, sys.stderr)
        raise _ParserExitError(status)


def _add_global_options(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    """The global options, accepted before or after the subcommand.

    In a subcommand they default to SUPPRESS so an absent option does not overwrite the
    value given before the subcommand.
    """
    def default(value: object) -> object:
        return argparse.SUPPRESS if in_subcommand else value

    parser.add_argument("--config", metavar="FILE", type=_path, default=default(None),
                        help=f"configuration file (env VIRTSYNC_CONFIG; default {DEFAULT_CONFIG})")
    parser.add_argument("--socket", metavar="PATH", type=_path, default=default(None),
                        help=f"daemon socket (env VIRTSYNC_SOCKET, else [agent] socket, else {DEFAULT_SOCKET})")
    parser.add_argument("--json", action="store_true", default=default(False), help="print the result as JSON")
    parser.add_argument("--debug", action="store_true", default=default(False),
                        help="debug logging and tracebacks on errors")


def _socket_from_config(path: str, explicit: bool) -> str | None:
    """``[agent] socket`` of the config file; the CLI needs nothing else from it.

    An unreadable or broken file is ignored (the daemon reports it): a user in the virtsync
    group usually cannot read /etc/virtsync, and the default socket is then right.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} not found") from None
        return None
    except (OSError, ValueError) as e:   # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        log.debug("ignoring config %s: %s", path, e)
        return None
    agent = data.get("agent")
    value = agent.get("socket") if isinstance(agent, dict) else None
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(f"[agent] socket in {path} must be a non-empty path")
    return value


def resolve_socket(args: argparse.Namespace) -> str:
    """--socket, then $VIRTSYNC_SOCKET, then ``[agent] socket`` in the config, then the default."""
    if args.socket:
        return str(args.socket)
    env = os.environ.get("VIRTSYNC_SOCKET")
    if env:
        return env
    config = args.config or os.environ.get("VIRTSYNC_CONFIG") or DEFAULT_CONFIG
    explicit = bool(args.config or os.environ.get("VIRTSYNC_CONFIG"))
    return _socket_from_config(config, explicit) or DEFAULT_SOCKET


# ----------------------------------------------------------------------------- commands

class Command:
    """One subcommand: its arguments, the request it sends, and how it prints the result."""

    name: ClassVar[str]
    help: ClassVar[str]

    def register(self, subparsers: argparse._SubParsersAction[_Parser]) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(self.name, help=self.help, description=self.help)
        _add_global_options(parser, in_subcommand=True)
        self.add_arguments(parser)
        parser.set_defaults(command=self)
        return parser

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Subcommand arguments; none by default."""

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        """The ``args`` of the request; keys match the long options in snake_case."""
        return {}

    def run(self, args: argparse.Namespace) -> int:
        wait = bool(getattr(args, "wait", False))
        progress = ProgressRenderer(sys.stderr) if wait else None
        try:
            result = ipc.request(args.socket, self.name, self.request_args(args),
                                 timeout=WAIT_TIMEOUT if wait else REQUEST_TIMEOUT, on_progress=progress)
        finally:
            if progress is not None:
                progress.close()
        if args.json:
            print(json.dumps(result, sort_keys=True, indent=2))
        else:
            for line in self.render(result, args):
                print(line)
        return 0

    def render(self, result: object, args: argparse.Namespace) -> list[str]:
        """Readable text; unknown shapes fall back to JSON rather than failing."""
        message = _field(result, "message")
        if isinstance(message, str):
            return [one_line(message)]
        return [json.dumps(result, sort_keys=True, indent=2)]


class _DomainCommand(Command):
    """A command on one domain: ``virtsync NAME DOMAIN``."""

    done: ClassVar[str] = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("domain", metavar="DOMAIN", type=_name("domain"), help="libvirt domain name")

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"domain": args.domain}

    def render(self, result: object, args: argparse.Namespace) -> list[str]:
        if isinstance(_field(result, "message"), str) or not self.done:
            return super().render(result, args)
        return [f"{one_line(args.domain)}: {self.done}"]


class _ReplicaCommand(_DomainCommand):
    """A command on a domain's replica kept here: ``--from PEER`` picks one where peers share a name."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--from", dest="from_peer", metavar="PEER", type=_name("peer"),
                            help="the peer whose replica is meant, where replicas of several peers share the name")

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        request = super().request_args(args)
        if args.from_peer is not None:
            request["from"] = args.from_peer
        return request


PAIR_HEADERS = ("DOMAIN", "TARGET", "PEER", "STATE", "LAG", "BEHIND", "MARKER", "RATE")


def pair_lines(pairs: list[dict[str, Any]], indent: str = "") -> list[str]:
    """The pairs table; an error row is followed by its reason."""
    rows = []
    for p in pairs:
        state = _cell(p.get("state"))
        done, total = _number(p.get("bytes_done")), _number(p.get("bytes_total"))
        if state == "initial-copy" and done is not None and total:
            state += f" {min(done / total, 1.0) * 100:.0f}%"
        marker = p.get("last_marker")
        rows.append([_cell(p.get("domain")), _cell(p.get("target")), _cell(p.get("peer")), state,
                     human_duration(p.get("lag_seconds")), human_bytes(p.get("bytes_behind")),
                     _cell(marker) if marker else "-", human_rate(p.get("throughput_bps"))])
    head, *body = table(PAIR_HEADERS, rows, indent)
    lines = [head]
    for p, line in zip(pairs, body, strict=True):
        lines.append(line)
        if p.get("reason"):
            lines.append(f"{indent}    reason: {one_line(str(p['reason']))}")
    return lines


class StatusCommand(Command):
    name = "status"
    help = "agent, peers and protected domains at a glance"

    def render(self, result: object, args: argparse.Namespace) -> list[str]:
        if not isinstance(result, dict):
            return super().render(result, args)
        lines = [f"host: {_cell(result.get('host'))}", "peers:"]
        peers = _dicts(result.get("peers"))
        if peers:
            lines += table(("NAME", "ADDRESS", "REACHABLE", "NBD SERVER"),
                           [[_cell(p.get("name")), _cell(p.get("address")), _cell(bool(p.get("reachable"))),
                             _cell(p.get("nbd_server")) if p.get("nbd_server") else "-"] for p in peers], "  ")
        else:
            lines.append("  (none)")
        lines.append("domains:")
        domains = _dicts(result.get("domains"))
        if not domains:
            lines.append("  (none)")
            return lines
        rows = []
        for d in domains:
            lag, rpo = _number(d.get("lag_seconds")), _number(d.get("rpo"))
            # A stopped or suspended domain writes nothing new: its age is no lateness.
            late = lag is not None and rpo is not None and lag > rpo and d.get("state") not in ("stopped", "suspended")
            marker = d.get("last_marker")
            rows.append([_cell(d.get("domain")), _cell(d.get("peer")), _cell(d.get("state")),
                         human_duration(lag) + (" (over RPO)" if late else ""),
                         human_duration(rpo), _cell(marker) if marker else "-"])
        head, *body = table(("DOMAIN", "PEER", "STATE", "LAG", "RPO", "MARKER"), rows, "  ")
        lines.append(head)
        for d, line in zip(domains, body, strict=True):
            lines.append(line)
            if d.get("reason"):
                lines.append(f"      reason: {one_line(str(d['reason']))}")
        return lines + _replica_lines(result.get("replicas"))


def _replica_lines(replicas: object) -> list[str]:
    """The replicas this host keeps (the secondary's side), with their damage."""
    reps = _dicts(replicas)
    if not reps:
        return []
    lines = ["replicas:"]
    rows = []
    for r in reps:
        findings = r.get("findings") or []
        damaged = bool(findings or r.get("journal_damage"))
        rows.append([_cell(r.get("domain")), _cell(r.get("peer")), _cell(r.get("applied")),
                     _cell(r.get("last_marker")), _time(r.get("checked_at")) if r.get("checked_at") else "never",
                     "DAMAGED" if damaged else "ok"])
    lines += table(("DOMAIN", "PEER", "APPLIED", "NEWEST", "VERIFIED", "INTEGRITY"), rows, "  ")
    for r in reps:
        for why in ([r["journal_damage"]] if r.get("journal_damage") else []) + list(r.get("findings") or []):
            lines.append(f"  {one_line(str(r.get('domain')))}: damaged: {one_line(str(why))}")
    return lines


class ProtectCommand(_DomainCommand):
    name = "protect"
    help = "start replicating a domain's disks to a peer"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--to", metavar="PEER", type=_name("peer"), required=True, help="peer agent name")
        parser.add_argument("--segment", metavar="S", type=_name("segment"), help="business segment")
        parser.add_argument("--rpo", metavar="SECONDS", type=_rpo, help=f"recovery point objective, 1..{MAX_RPO}")
        parser.add_argument("--mode", choices=("async", "sync"), help="replication mode")
        parser.add_argument("--wait", action="store_true", help="show progress until the initial copy is done")

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"domain": args.domain, "to": args.to, "segment": args.segment, "rpo": args.rpo,
                "mode": args.mode, "wait": args.wait}

    def render(self, result: object, args: argparse.Namespace) -> list[str]:
        if isinstance(_field(result, "message"), str):
            return super().render(result, args)
        lines = [f"{one_line(args.domain)}: protected to {one_line(args.to)}"]
        pairs = _dicts(_field(result, "pairs"))
        return lines + pair_lines(pairs) if pairs else lines


class UnprotectCommand(_DomainCommand):
    name = "unprotect"
    help = "stop replicating a domain (the replica is deleted unless --keep-replica)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--keep-replica", action="store_true", help="leave the replica on the peer")

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"domain": args.domain, "keep_replica": args.keep_replica}

    def render(self, result: object, args: argparse.Namespace) -> list[str]:
        if isinstance(_field(result, "message"), str):
            return super().render(result, args)
        kept = " (replica kept)" if args.keep_replica else ""
        return [f"{one_line(args.domain)}: unprotected{kept}"]


class PairsCommand(Command):
    name = "pairs"
    help = "copy pairs with state, lag, bytes behind and last marker"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("domain", metavar="DOMAIN", nargs="?", type=_name("domain"),
                            help="only this domain's pairs")

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"domain": args.domain}

    def render(self, result: object, args: argparse.Namespace) -> list[str]:
        if not isinstance(result, dict):
            return super().render(result, args)
        pairs = _dicts(result.get("pairs"))
        return pair_lines(pairs) if pairs else ["no pairs"]


class SuspendCommand(_DomainCommand):
    name = "suspend"
    help = "pause replication of a domain (changes are still tracked)"
    done = "replication suspended"


class ResumeCommand(_DomainCommand):
    name = "resume"
    help = "resume replication of a suspended domain"
    done = "replication resumed"


class MarkCommand(_DomainCommand):
    name = "mark"
    help = "cut a consistent marker across the domain's disks now"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--label", metavar="L", type=_label, help=f"free text, at most {MAX_LABEL} characters")
        parser.add_argument("--quiesce", action="store_true",
                            help="freeze guest file systems (qemu-guest-agent) for the cut; waits for the marker, "
                                 "since without an answering agent none is taken")
        parser.add_argument("--crash-consistent-ok", action="store_true",
                            help="with --quiesce: when no guest agent answers, take a crash-consistent marker "
                                 "instead of none")
        parser.add_argument("--no-apply", action="store_true", help="journal the marker but never apply it")
        parser.add_argument("--wait", action="store_true", help="show progress until the marker is committed")

    def run(self, args: argparse.Namespace) -> int:
        if args.quiesce:
            args.wait = True   # whether a marker is taken at all depends on the guest agent: say it
        return super().run(args)

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        request = {"domain": args.domain, "label": args.label, "quiesce": args.quiesce,
                   "no_apply": args.no_apply, "wait": args.wait}
        if args.crash_consistent_ok:
            request["crash_consistent_ok"] = True
        return request

    def render(self, result: object, args: argparse.Namespace) -> list[str]:
        if isinstance(_field(result, "message"), str):
            return super().render(result, args)
        marker = _field(result, "marker") if isinstance(_field(result, "marker"), dict) else result
        seq = _field(marker, "seq")
        if seq is None:
            return [f"{one_line(args.domain)}: marker requested"]
        label = _field(marker, "label")
        quiesced = _field(marker, "quiesced")
        how = "" if quiesced is None or not args.quiesce else (
            ", quiesced" if quiesced else ", crash-consistent (not quiesced)")
        return [f"{one_line(args.domain)}: marker {_cell(seq)}" + (f" ({one_line(str(label))})" if label else "")
                + how]


class MarkersCommand(_ReplicaCommand):
    name = "markers"
    help = "a domain's committed markers (points in time on the secondary)"

    def render(self, result: object, args: argparse.Namespace) -> list[str]:
        if not isinstance(result, dict):
            return super().render(result, args)
        markers = _dicts(result.get("markers"))
        if not markers:
            return [f"no markers for {one_line(args.domain)}"]
        rows = []
        for m in markers:
            size = m.get("bytes")
            if isinstance(size, dict):   # per-disk byte counts, as in the Marker model
                size = sum(v for v in size.values() if _number(v) is not None)
            rows.append([_cell(m.get("seq")), _time(m.get("cut_time")), _cell(m.get("label")), human_bytes(size),
                         _cell(m.get("apply")), _cell(m.get("applied")), "DAMAGED" if m.get("damage") else "ok"])
        lines = table(("SEQ", "CUT TIME", "LABEL", "BYTES", "APPLY", "APPLIED", "INTEGRITY"), rows)
        return lines + _integrity_lines(result.get("integrity"), markers)


def _integrity_lines(report: object, markers: list[dict[str, Any]] | None = None) -> list[str]:
    """The last check of a replica and what it found, one line per finding."""
    if not isinstance(report, dict):
        return []
    checked = report.get("checked_at")
    findings = [str(f) for f in report.get("findings") or []]
    lines = [f"last verified: {_time(checked) if checked else 'never'}"
             + (f", {len(findings)} finding(s)" if findings else ", no damage found" if checked else "")]
    lines += [f"  damaged: {one_line(f)}" for f in findings]
    for m in markers or []:
        if m.get("damage"):
            lines.append(f"  marker {_cell(m.get('seq'))} will not restore: {one_line(str(m['damage']))}")
    return lines


class VerifyCommand(_DomainCommand):
    name = "verify"
    help = ("on the secondary: check the replica's base, segments and hash records now (a scrub); "
            "exit 1 when damage is found")

    def run(self, args: argparse.Namespace) -> int:
        result = ipc.request(args.socket, self.name, self.request_args(args), timeout=WAIT_TIMEOUT)
        if args.json:
            print(json.dumps(result, sort_keys=True, indent=2))
        else:
            for line in self.render(result, args):
                print(line)
        return 1 if _field(result, "findings") else 0

    def render(self, result: object, args: argparse.Namespace) -> list[str]:
        if not isinstance(result, dict):
            return super().render(result, args)
        findings = [str(f) for f in result.get("findings") or []]
        head = (f"{one_line(args.domain)}: verified {human_bytes(result.get('bytes'))} in "
                f"{human_duration(result.get('seconds'))}: ")
        lines = [head + (f"{len(findings)} finding(s)" if findings else "no damage found")]
        lines += [f"  damaged: {one_line(f)}" for f in findings]
        damaged = result.get("markers")
        if isinstance(damaged, dict):
            for seq in sorted(damaged, key=lambda s: int(s) if str(s).isdigit() else 0):
                lines.append(f"  marker {one_line(str(seq))} will not restore: {one_line(str(damaged[seq]))}")
        return lines


def _marker_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a marker is a sequence number, not {one_line(text)!r}") from None
    if not 1 <= value <= 2**62:
        raise argparse.ArgumentTypeError(f"marker {value} is out of range")
    return value


def _journal_line(result: object, args: argparse.Namespace) -> list[str]:
    applied, last = _field(result, "applied"), _field(result, "last_marker")
    held = " (held)" if _field(result, "held") else ""
    damage = _field(result, "damage")
    lines = [f"{one_line(args.domain)}: replica at marker {_cell(applied)} of {_cell(last)}{held}"]
    if damage:
        lines.append(f"  journal damaged: {one_line(str(damage))}")
    return lines


class ApplyCommand(_ReplicaCommand):
    name = "apply"
    help = "on the secondary: apply journaled markers to the replica (up to --until)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--until", metavar="MARKER", type=_marker_number,
                            help="apply exactly up to this marker, past holds and --no-apply markers")

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {**super().request_args(args), "until": args.until}

    def render(self, result: object, args: argparse.Namespace) -> list[str]:
        return _journal_line(result, args) if isinstance(result, dict) else super().render(result, args)


class HoldCommand(ApplyCommand):
    name = "hold"
    help = "on the secondary: stop applying markers (the journal keeps growing)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _ReplicaCommand.add_arguments(self, parser)

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return _ReplicaCommand.request_args(self, args)


class ReleaseCommand(HoldCommand):
    name = "release"
    help = "on the secondary: apply markers again"


class RestoreCommand(_ReplicaCommand):
    name = "restore"
    help = "on the secondary: write each disk as of a retained marker to a directory"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--marker", metavar="MARKER", type=_marker_number, required=True)
        parser.add_argument("--to", metavar="DIR", required=True, help="an empty or new directory (absolute path)")

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {**super().request_args(args), "marker": args.marker, "to": os.path.abspath(args.to)}

    def render(self, result: object, args: argparse.Namespace) -> list[str]:
        disks = _field(result, "disks")
        if not isinstance(disks, dict):
            return super().render(result, args)
        return [f"{one_line(args.domain)}: marker {_cell(_field(result, 'marker'))} restored"] + [
            f"  {one_line(str(t))}: {one_line(str(p))}" for t, p in sorted(disks.items())]


class TrackerCommand(Command):
    name = "tracker"
    help = "the disk-list changes the mapping tracker has seen, and what it did"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("domain", metavar="DOMAIN", nargs="?", type=_name("domain"), help="only this domain")

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"domain": args.domain}

    def render(self, result: object, args: argparse.Namespace) -> list[str]:
        changes = _dicts(_field(result, "changes"))
        if not isinstance(result, dict):
            return super().render(result, args)
        if not changes:
            return ["no disk changes seen"]
        rows = [[_time(c.get("time")), _cell(c.get("domain")), _cell(c.get("kind")), _cell(c.get("target")),
                 _cell(c.get("detail")), _cell(c.get("reason")), _cell(c.get("action"))] for c in changes]
        return table(("TIME", "DOMAIN", "CHANGE", "TARGET", "DETAIL", "SEEN ON", "ACTION"), rows)


class HookCommand(Command):
    """``virtsync hook install|uninstall [--dir DIR]``: runs locally, without the daemon.

    The hook gets the socket this CLI would use (--socket, $VIRTSYNC_SOCKET, ``[agent] socket``)
    and the spool ``<[agent] state_dir>/hook-spool.jsonl`` baked in, and this interpreter in
    its ``#!`` line. :mod:`plugin.hook` is imported here only, so other commands stay lean.
    """

    name = "hook"
    help = "install or remove the libvirt qemu hook (local; no daemon needed)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("action", choices=("install", "uninstall"), help="what to do")
        parser.add_argument("--dir", metavar="DIR", type=_path, default="/etc/libvirt/hooks/qemu.d",
                            help="libvirt's qemu hook directory (default /etc/libvirt/hooks/qemu.d)")

    def run(self, args: argparse.Namespace) -> int:
        from plugin import hook

        if args.action == "uninstall":
            removed = hook.uninstall(args.dir)
            path = os.path.join(args.dir, hook.HOOK_NAME)
            result: dict[str, Any] = {"action": "uninstall", "path": path, "removed": removed}
            text = [f"removed {path}" if removed else f"no hook at {path}"]
        else:
            config = args.config or os.environ.get("VIRTSYNC_CONFIG") or DEFAULT_CONFIG
            explicit = bool(args.config or os.environ.get("VIRTSYNC_CONFIG"))
            spool = hook.spool_path(hook.state_dir_from_config(config, explicit))
            socket_path = os.path.abspath(args.socket)
            target = hook.install(args.dir, socket_path=socket_path, spool=spool)
            result = {"action": "install", "path": str(target), "socket": socket_path, "spool": spool,
                      "interpreter": sys.executable}
            text = [f"installed {target}", f"  socket: {socket_path}", f"  spool:  {spool}",
                    "libvirtd reads hooks only at start or on SIGHUP: reload it (systemctl reload libvirtd)"]
        if args.json:
            print(json.dumps(result, sort_keys=True, indent=2))
        else:
            for line in text:
                print(one_line(line))
        return 0


class KeysCommand(Command):
    """``virtsync keys init|import|show``: TLS material in ``[agent] keys_dir``; runs locally,
    without the daemon (:mod:`plugin.keys` describes the files and how a pair is set up).

    No secret is ever printed: only paths and certificate fingerprints.
    """

    name = "keys"
    help = "TLS keys for the data and control links (local; no daemon needed)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        actions = parser.add_subparsers(metavar="ACTION", dest="keys_action", required=True)
        init = actions.add_parser("init", help="this host's identity (if missing) and a new NBD key for PEER",
                                  description="Create this agent's key and certificate if missing, and the "
                                  "NBD pre-shared key shared with PEER if missing; print what to copy to PEER.")
        init.add_argument("peer", metavar="PEER", type=_name("peer"), help="peer agent name")
        init.add_argument("--renew", action="store_true",
                          help="replace this host's key and certificate (every peer must import the new one)")
        imp = actions.add_parser("import", help="pin PEER's certificate and/or take the NBD key PEER made",
                                 description="Pin PEER's certificate (its keys_dir/agent.crt) and/or store the "
                                 "NBD key that 'keys init' made on PEER (its keys_dir/<this host>/keys.psk).")
        imp.add_argument("peer", metavar="PEER", type=_name("peer"), help="peer agent name")
        imp.add_argument("--cert", metavar="FILE", type=_path, help="PEER's certificate (agent.crt)")
        imp.add_argument("--psk", metavar="FILE", type=_path, help="the pair's NBD key file (keys.psk)")
        actions.add_parser("show", help="this host's fingerprint and each peer's keys (no secret shown)")
        for sub in actions.choices.values():
            _add_global_options(sub, in_subcommand=True)

    def run(self, args: argparse.Namespace) -> int:
        from plugin import config as config_mod
        from plugin import keys

        path = args.config or os.environ.get("VIRTSYNC_CONFIG") or DEFAULT_CONFIG
        cfg = config_mod.load(path)
        kd = keys.KeysDir(cfg.keys_dir, cfg.name)
        result: dict[str, Any] = {"keys_dir": cfg.keys_dir, "name": cfg.name}
        text: list[str] = []
        if args.keys_action == "show":
            result["fingerprint"] = kd.fingerprint()
            peers = []
            names = set(cfg.peers)
            if os.path.isdir(cfg.keys_dir):
                names |= {n for n in os.listdir(cfg.keys_dir) if os.path.isdir(os.path.join(cfg.keys_dir, n))
                          and not n.startswith(".") and n != cfg.name}
            for peer_name in sorted(names):
                entry: dict[str, Any] = {"peer": peer_name, "configured": peer_name in cfg.peers,
                                         "insecure_plain": peer_name in cfg.peers and cfg.peers[peer_name].insecure_plain}
                try:
                    with open(kd.peer_cert_path(peer_name)) as f:
                        entry["cert_fingerprint"] = keys.fingerprint(f.read())
                except (OSError, ValueError, keys.KeyFileError):
                    entry["cert_fingerprint"] = None
                try:
                    kd.peer_psk(peer_name)
                    entry["nbd_key"] = "ok"
                except keys.KeyFileError as e:
                    entry["nbd_key"] = "missing" if "no NBD key" in str(e) else f"unusable: {e}"
                peers.append(entry)
            result["peers"] = peers
            text.append(f"{cfg.name}: {result['fingerprint'] or 'no identity yet (virtsync keys init PEER)'}")
            text += table(("PEER", "CERTIFICATE", "NBD KEY", "NOTE"), [
                [p["peer"], p["cert_fingerprint"] or "not pinned", p["nbd_key"],
                 "insecure_plain" if p["insecure_plain"] else ("" if p["configured"] else "not in config")]
                for p in peers]) if peers else ["no peers"]
        else:
            peer_name = args.peer
            kd.peer_dir(peer_name)  # refuses this host's own name
            if peer_name not in cfg.peers:
                print(f"virtsync: note: {one_line(peer_name)} is not a peer in {one_line(path)} yet", file=sys.stderr)
            if args.keys_action == "import" and not (args.cert or args.psk):
                raise ConfigError("keys import needs --cert FILE, --psk FILE or both")
            created = kd.ensure_identity(renew=bool(getattr(args, "renew", False)))
            result.update(fingerprint=kd.fingerprint(), identity_created=created, cert=kd.cert_path)
            text.append(f"identity: {kd.cert_path} ({'created' if created else 'exists'}) {result['fingerprint']}")
            if args.keys_action == "init":
                made = kd.ensure_psk(peer_name)
                result.update(psk=kd.psk_path(peer_name), psk_created=made)
                text += [f"NBD key for {peer_name}: {kd.psk_path(peer_name)} "
                         f"({'created' if made else 'exists'}; secret, not shown)",
                         f"next: copy {kd.cert_path} and {kd.psk_path(peer_name)} to {peer_name} over a "
                         f"secure channel (scp) and run there:",
                         f"  virtsync keys import {cfg.name} --cert FILE --psk FILE"]
                if not os.path.exists(kd.peer_cert_path(peer_name)):
                    text.append(f"then pin {peer_name}'s certificate here: "
                                f"virtsync keys import {peer_name} --cert FILE")
            else:
                if args.cert:
                    fp, changed = kd.import_cert(peer_name, args.cert)
                    result.update(peer_cert=kd.peer_cert_path(peer_name), peer_fingerprint=fp, cert_changed=changed)
                    text.append(f"{peer_name}: certificate {fp} pinned in {kd.peer_cert_path(peer_name)}"
                                + ("" if changed else " (unchanged)"))
                if args.psk:
                    changed = kd.import_psk(peer_name, args.psk)
                    result.update(psk=kd.psk_path(peer_name), psk_changed=changed)
                    text.append(f"{peer_name}: NBD key stored in {kd.psk_path(peer_name)}"
                                + ("" if changed else " (unchanged)") + "; secret, not shown")
            text.append("restart the agent to use new keys; compare fingerprints with 'virtsync keys show' on both hosts")
        if args.json:
            print(json.dumps(result, sort_keys=True, indent=2))
        else:
            for line in text:
                print(one_line(line, 1000))
        return 0


COMMANDS: tuple[type[Command], ...] = (StatusCommand, ProtectCommand, UnprotectCommand, PairsCommand,
                                       SuspendCommand, ResumeCommand, MarkCommand, MarkersCommand,
                                       ApplyCommand, HoldCommand, ReleaseCommand, RestoreCommand, VerifyCommand,
                                       TrackerCommand, HookCommand, KeysCommand)


def build_parser() -> _Parser:
    parser = _Parser(prog="virtsync", description="Asynchronous replication of libvirt/QEMU domains.")
    _add_global_options(parser, in_subcommand=False)
    subparsers = parser.add_subparsers(metavar="COMMAND", dest="command_name", required=True)
    for command in COMMANDS:
        command().register(subparsers)
    return parser


def _error_name(exc: BaseException) -> str:
    return str(getattr(exc, "type_name", "") or type(exc).__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit code (0 ok, 1 failed, 2 bad usage or config, 130 ^C)."""
    parser = build_parser()
    debug = False
    try:
        try:
            args = parser.parse_args(argv)
        except _UsageError as e:
            print(f"virtsync: error: {one_line(str(e))} (see '{one_line(e.prog)} --help')", file=sys.stderr)
            return 2
        except _ParserExitError as e:
            return e.status
        debug = bool(args.debug)
        if debug:
            logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s: %(message)s")
        args.socket = resolve_socket(args)
        command: Command = args.command
        return command.run(args)
    except KeyboardInterrupt:
        return 130
    except PluginError as e:
        if debug:
            traceback.print_exc()
        text = one_line(str(e))
        print(f"{_error_name(e)}: {text}" if text else _error_name(e), file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # stdout went away (`virtsync pairs | head`): stop quietly, as the Python docs advise.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except Exception as e:
        if debug:
            traceback.print_exc()
        print(f"{type(e).__name__}: {one_line(str(e))} (a bug in virtsync; --debug shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
