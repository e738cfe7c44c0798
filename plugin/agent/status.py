"""Status: this host at a glance (peers, protected domains by their worst pair, replicas kept here)."""

from __future__ import annotations

from typing import Any

from .. import ops
from ..domain import PairState, severity
from ..errors import PluginError
from .group import PRIMARY
from .parts import Parts
from .protection import ProtectionService


class Status:
    def __init__(self, parts: Parts, protection: ProtectionService) -> None:
        self.parts = parts
        self.protection = protection

    def operations(self) -> dict[str, Any]:
        return {ops.STATUS: self.op_status}

    async def op_status(self, args: dict[str, Any]) -> Any:
        peers = []
        for name, client in self.parts.peers.items():
            try:
                await client.call("health", {}, timeout=2)
                ok = True
            except PluginError:
                ok = False
            served = name in self.parts.nbd.daemons   # the NBD server for that peer's replicas kept here
            peers.append({"name": name, "address": f"{client.spec.address}:{client.spec.port}", "reachable": ok,
                          "nbd_server": f"{self.parts.nbd.address}:{self.parts.nbd.ports[name]}" if served else None})
        doms = []
        down = await self.protection.down()
        for prot in self.parts.db().protections(PRIMARY):
            pairs = self.protection.pairs_json(prot["domain_uuid"], down)
            # The domain shows its worst pair, with that pair's reason.
            worst = min(pairs, key=lambda pp: severity(PairState(pp["state"])), default=None)
            doms.append({"domain": prot["domain"], "peer": prot["peer"], "rpo": prot["rpo"],
                         "state": worst["state"] if worst else "-", "reason": worst["reason"] if worst else "",
                         "lag_seconds": max((pp["lag_seconds"] or 0 for pp in pairs), default=None),
                         "last_marker": prot["committed_seq"]})
        # Trouble first.
        doms.sort(key=lambda d: severity(PairState(d["state"])) if d["state"] != "-" else len(PairState))
        return {"host": self.parts.cfg.name, "peers": peers, "domains": doms, "replicas": self.parts.sec().replica_status()}
