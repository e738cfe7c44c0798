"""Dirty bitmaps: the record of what changed since the last cut.

Only bitmaps named ``vs-…`` are ours. A persistent bitmap that was not stored
cleanly (QEMU killed) loads *inconsistent*: its bits cannot be trusted, so it
must be removed and the pair resynchronised in full.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import commands
from .errors import BitmapError
from .models import BitmapInfo, BlockNode
from .nodes import query_nodes
from .transport import QmpTransport


async def add(
    transport: QmpTransport, node: str, name: str, *, persistent: bool = True,
    disabled: bool = False, granularity: int | None = None,
) -> None:
    await transport.execute(
        "block-dirty-bitmap-add",
        commands.bitmap_add_args(node, name, persistent=persistent, disabled=disabled, granularity=granularity),
    )


async def remove(transport: QmpTransport, node: str, name: str) -> None:
    await transport.execute("block-dirty-bitmap-remove", commands.bitmap_args(node, name))


async def clear(transport: QmpTransport, node: str, name: str) -> None:
    await transport.execute("block-dirty-bitmap-clear", commands.bitmap_args(node, name))


async def enable(transport: QmpTransport, node: str, name: str) -> None:
    await transport.execute("block-dirty-bitmap-enable", commands.bitmap_args(node, name))


async def disable(transport: QmpTransport, node: str, name: str) -> None:
    await transport.execute("block-dirty-bitmap-disable", commands.bitmap_args(node, name))


async def merge(transport: QmpTransport, node: str, target: str, sources: Sequence[str]) -> None:
    await transport.execute("block-dirty-bitmap-merge", commands.bitmap_merge_args(node, target, sources))


async def info(transport: QmpTransport, node: str, name: str) -> BitmapInfo:
    """The bitmap's counts and flags.

    :raise BitmapError: no such node or no such bitmap on it
    """
    for block_node in await query_nodes(transport):
        if block_node.node_name == node:
            bitmap = block_node.bitmap(name)
            if bitmap is None:
                raise BitmapError(f"node {node!r} has no dirty bitmap {name!r}")
            return bitmap
    raise BitmapError(f"no block node {node!r}")


async def dirty_bytes(transport: QmpTransport, node: str, name: str) -> int:
    """Bytes marked dirty: what the next incremental cycle will send."""
    return (await info(transport, node, name)).count


def check_usable(node: BlockNode | None, node_name: str, name: str) -> BitmapInfo:
    """The bitmap from an already-queried node, if an incremental copy may rely on it.

    :raise BitmapError: no such node or bitmap, or it is inconsistent (QEMU did not
        store it cleanly) or busy
    """
    if node is None:
        raise BitmapError(f"no block node {node_name!r}")
    bitmap = node.bitmap(name)
    if bitmap is None:
        raise BitmapError(f"node {node_name!r} has no dirty bitmap {name!r}")
    if bitmap.inconsistent:
        raise BitmapError(f"dirty bitmap {name!r} on {node_name!r} is inconsistent: a full resync is needed")
    if bitmap.busy:
        raise BitmapError(f"dirty bitmap {name!r} on {node_name!r} is in use by another job")
    return bitmap


async def require_usable(transport: QmpTransport, node: str, name: str) -> BitmapInfo:
    """Return the bitmap if an incremental copy may rely on it (see :func:`check_usable`)."""
    found = {n.node_name: n for n in await query_nodes(transport)}
    return check_usable(found.get(node), node, name)
