"""``virtsync tracker``: the disk-list changes the mapping tracker saw."""

from __future__ import annotations

import argparse
from typing import Any

from plugin import ops
from plugin.cli.base import Command, _name
from plugin.cli.output import _cell, _dicts, _field, _time, table


class TrackerCommand(Command):
    name = "tracker"
    op = ops.TRACKER
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
