"""Block nodes, NBD exports and transactions: thin typed calls over a transport."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from . import commands
from .errors import JobTimeoutError, QmpCommandError
from .models import BlockNode, JobInfo, parse_jobs, parse_nodes
from .transport import QmpTransport


async def blockdev_add(transport: QmpTransport, node: Mapping[str, Any]) -> str:
    """Add a node built by :mod:`commands`; return its node name."""
    name = commands.owned(str(node.get("node-name")))
    await transport.execute("blockdev-add", dict(node))
    return name


async def blockdev_del(transport: QmpTransport, node_name: str, *, missing_ok: bool = False) -> None:
    try:
        await transport.execute("blockdev-del", commands.blockdev_del_args(node_name))
    except QmpCommandError as e:
        if not (missing_ok and _is_not_found(e)):
            raise


def _is_not_found(error: QmpCommandError) -> bool:
    desc = error.desc.lower()
    return error.error_class == "DeviceNotFound" or any(
        text in desc for text in ("not found", "cannot find", "failed to find"))


async def query_nodes(transport: QmpTransport) -> list[BlockNode]:
    """Every named node, flat (``query-block`` hides bitmaps under filters)."""
    return parse_nodes(await transport.execute("query-named-block-nodes", {"flat": True}))


async def find_node(transport: QmpTransport, node_name: str) -> BlockNode | None:
    return next((n for n in await query_nodes(transport) if n.node_name == node_name), None)


async def query_jobs(transport: QmpTransport) -> list[JobInfo]:
    return parse_jobs(await transport.execute("query-jobs"))


async def transaction(
    transport: QmpTransport, actions: Sequence[Mapping[str, Any]], *, grouped: bool = True
) -> None:
    """Run actions atomically: all take effect at one instant, or none does."""
    await transport.execute("transaction", commands.transaction_args([dict(a) for a in actions], grouped=grouped))


async def object_add(transport: QmpTransport, args: Mapping[str, Any]) -> str:
    """Add a QOM object built by :mod:`commands` (``tls_creds_psk_args``); return its id."""
    object_id = commands.owned(str(args.get("id")))
    await transport.execute("object-add", dict(args))
    return object_id


async def object_del(transport: QmpTransport, object_id: str, *, missing_ok: bool = False) -> None:
    try:
        await transport.execute("object-del", commands.object_del_args(object_id))
    except QmpCommandError as e:
        if not (missing_ok and _is_not_found(e)):
            raise


async def nbd_server_start(transport: QmpTransport, **kwargs: Any) -> None:
    await transport.execute("nbd-server-start", commands.nbd_server_start_args(**kwargs))


async def nbd_server_stop(transport: QmpTransport) -> None:
    await transport.execute("nbd-server-stop")


async def export_add(
    transport: QmpTransport, export_id: str, node: str, *, writable: bool = False,
    name: str | None = None,
) -> str:
    """Export ``node`` over the running NBD server; return the export name."""
    args = commands.block_export_add_args(export_id, node, name=name, writable=writable)
    await transport.execute("block-export-add", args)
    return str(args["name"])


async def export_del(
    transport: QmpTransport, export_id: str, *, force: bool = False, timeout: float = 10.0
) -> None:
    """Remove an export and wait until QEMU has really let go of its node.

    block-export-del only *requests* removal; the node stays in use until
    ``BLOCK_EXPORT_DELETED`` (clients may still be draining).

    :raise JobTimeoutError: the export was not deleted within ``timeout``
    """
    with transport.listen(("BLOCK_EXPORT_DELETED",), lambda e: e.data.get("id") == export_id) as events:
        await transport.execute("block-export-del", commands.block_export_del_args(export_id, force=force))
        try:
            async with asyncio.timeout(timeout):
                await events.get()
        except TimeoutError as e:
            raise JobTimeoutError(export_id, f"export not deleted after {timeout:g}s") from e
