"""External tools the replication runs (``qemu-img``), with one-line errors."""

from __future__ import annotations

import asyncio

from ..errors import PluginError


async def run_tool(*argv: str) -> str:
    """Run ``argv`` to completion and return its stdout; its stderr becomes the error's one line."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise PluginError(f"{argv[0]} {argv[1]} failed: {err.decode(errors='replace').strip()[:300]}")
    return out.decode(errors="replace")
