"""The peer API's operations on this host's replicas (the secondary role).

``op -> handler(body, caller)``; ``caller`` is the peer the request is
authenticated as (its pinned certificate). A peer acts only on replicas it owns
and speaks only for itself; every field is type-checked before use.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .replication.secondary import PeerRequestError, Secondary
from .requests import arg


def replica_handlers(name: str, sec: Callable[[], Secondary]) -> dict[str, Any]:

    def owned(body: dict[str, Any], caller: str) -> str:
        uuid: str = arg(body, "uuid", str)
        sec().authorize(uuid, caller)
        return uuid

    async def health(body: dict[str, Any], caller: str) -> dict[str, Any]:
        return {"name": name, "time": time.time()}

    async def info(body: dict[str, Any], caller: str) -> dict[str, Any]:
        return await sec().info_async(owned(body, caller))

    async def prepare(body: dict[str, Any], caller: str) -> dict[str, Any]:
        disks = arg(body, "disks", list)
        if not all(isinstance(d, dict) for d in disks):
            raise PeerRequestError("disks must be objects")
        primary = arg(body, "primary", str)
        if primary != caller:
            raise PeerRequestError(f"peer {caller} asked for a replica whose primary is {primary!r:.40}: "
                                   "a peer may only prepare replicas of its own domains")
        return await sec().prepare(owned(body, caller), arg(body, "domain", str),
                                   primary, disks, arg(body, "protection", dict, {}))

    async def open_cycle(body: dict[str, Any], caller: str) -> dict[str, Any]:
        targets = arg(body, "targets", list)
        sizes = arg(body, "sizes", dict, {})
        return await sec().open_cycle(owned(body, caller), arg(body, "seq", int), arg(body, "kind", str),
                                      [str(t) for t in targets], sizes)

    async def commit_cycle(body: dict[str, Any], caller: str) -> dict[str, Any]:
        nbytes = arg(body, "bytes", dict)
        if not all(isinstance(v, int) for v in nbytes.values()):
            raise PeerRequestError("bytes must map disks to integers")
        return await sec().commit_cycle(owned(body, caller), arg(body, "seq", int),
                                        arg(body, "cut_time", float), nbytes, arg(body, "label", str, ""),
                                        arg(body, "apply", bool, True))

    async def commit_empty(body: dict[str, Any], caller: str) -> dict[str, Any]:
        return await sec().commit_empty(owned(body, caller), arg(body, "seq", int),
                                        arg(body, "cut_time", float), arg(body, "label", str, ""),
                                        arg(body, "apply", bool, True))

    async def retire(body: dict[str, Any], caller: str) -> None:
        await sec().retire(owned(body, caller), arg(body, "target", str))

    async def abort_cycle(body: dict[str, Any], caller: str) -> None:
        await sec().abort_cycle(owned(body, caller), arg(body, "seq", int))

    async def remove(body: dict[str, Any], caller: str) -> None:
        await sec().remove(owned(body, caller), arg(body, "keep_replica", bool, False))

    return {"health": health, "info": info, "prepare": prepare, "open_cycle": open_cycle,
            "commit_cycle": commit_cycle, "commit_empty": commit_empty, "abort_cycle": abort_cycle,
            "remove": remove, "retire": retire}
