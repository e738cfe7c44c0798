"""qemu_blockdev: a typed async QMP block-job layer.

It speaks to any QEMU monitor through :class:`QmpTransport` and never imports
libvirt; the libvirt passthrough transport lives in ``plugin.virt``.
"""

from __future__ import annotations

from . import bitmaps, commands, nodes
from .commands import OWNER_PREFIX, owned
from .errors import (
    BitmapError,
    BlockdevError,
    JobError,
    JobFailedError,
    JobTimeoutError,
    QmpCommandError,
    TransportError,
)
from .jobs import BlockJob, JobTracker, cancel_jobs
from .models import BitmapInfo, BlockNode, JobInfo
from .transport import EventHub, EventListener, QmpEvent, QmpTransport, parse_reply

__all__ = [
    "BitmapError",
    "BitmapInfo",
    "BlockJob",
    "BlockNode",
    "BlockdevError",
    "EventHub",
    "EventListener",
    "JobError",
    "JobFailedError",
    "JobInfo",
    "JobTimeoutError",
    "JobTracker",
    "OWNER_PREFIX",
    "QmpCommandError",
    "QmpEvent",
    "QmpTransport",
    "TransportError",
    "bitmaps",
    "cancel_jobs",
    "commands",
    "nodes",
    "owned",
    "parse_reply",
]
