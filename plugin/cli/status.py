"""``virtsync status``: the agent, its peers, protected domains and the replicas kept here."""

from __future__ import annotations

import argparse

from plugin import ops
from plugin.cli.base import Command
from plugin.cli.output import _cell, _dicts, _number, _time, human_duration, one_line, table


class StatusCommand(Command):
    name = "status"
    op = ops.STATUS
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
