"""Protection and pairs: ``protect``, ``unprotect``, ``pairs``, ``suspend``, ``resume``."""

from __future__ import annotations

import argparse
from typing import Any

from plugin import ops
from plugin.cli.base import MAX_RPO, Command, _DomainCommand, _name, _rpo
from plugin.cli.output import _cell, _dicts, _field, _number, human_bytes, human_duration, human_rate, one_line, table

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


class ProtectCommand(_DomainCommand):
    name = "protect"
    op = ops.PROTECT
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
    op = ops.UNPROTECT
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
    op = ops.PAIRS
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
    op = ops.SUSPEND
    help = "pause replication of a domain (changes are still tracked)"
    done = "replication suspended"


class ResumeCommand(_DomainCommand):
    name = "resume"
    op = ops.RESUME
    help = "resume replication of a suspended domain"
    done = "replication resumed"
