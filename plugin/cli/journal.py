"""The journal and its markers: ``mark``, ``markers``, ``verify``, and on the secondary
``apply``, ``hold``, ``release``, ``restore``."""

from __future__ import annotations

import argparse
import os
from typing import Any

from plugin import ipc, ops
from plugin.cli.base import MAX_LABEL, WAIT_TIMEOUT, _DomainCommand, _label, _ReplicaCommand
from plugin.cli.output import (
    _cell,
    _dicts,
    _field,
    _number,
    _time,
    human_bytes,
    human_duration,
    one_line,
    print_result,
    table,
)


class MarkCommand(_DomainCommand):
    name = "mark"
    op = ops.MARK
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
    op = ops.MARKERS
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
    op = ops.VERIFY
    help = ("on the secondary: check the replica's base, segments and hash records now (a scrub); "
            "exit 1 when damage is found")

    def run(self, args: argparse.Namespace) -> int:
        result = ipc.request(args.socket, self.sent_op(), self.request_args(args), timeout=WAIT_TIMEOUT)
        print_result(result, [] if args.json else self.render(result, args), args.json)
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
    op = ops.APPLY
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
    op = ops.HOLD
    help = "on the secondary: stop applying markers (the journal keeps growing)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _ReplicaCommand.add_arguments(self, parser)

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return _ReplicaCommand.request_args(self, args)


class ReleaseCommand(HoldCommand):
    name = "release"
    op = ops.RELEASE
    help = "on the secondary: apply markers again"


class RestoreCommand(_ReplicaCommand):
    name = "restore"
    op = ops.RESTORE
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
