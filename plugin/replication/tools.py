"""External tools the replication runs (``qemu-img``), with one-line errors."""

from __future__ import annotations

import asyncio

from ..errors import PluginError


async def run_tool(*argv: str) -> None:
    """Run ``argv`` to completion; its stderr becomes the error's one line."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise PluginError(f"{argv[0]} {argv[1]} failed: {err.decode(errors='replace').strip()[:300]}")
