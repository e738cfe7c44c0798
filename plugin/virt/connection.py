"""Opening libvirt connections whose events run on the daemon's asyncio loop.

libvirt accepts one event loop implementation per process, for good:
libvirt-python raises ``RuntimeError("Event loop is already registered")`` on a
second registration. So :func:`ensure_event_impl` binds libvirtaio to the first
running loop that opens a connection, and refuses (instead of silently losing
events) when a later connection is opened from a different loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import libvirt
import libvirtaio

from plugin.errors import DomainNotFoundError, VirtError

__all__ = ["close_connection", "ensure_event_impl", "is_alive", "open_connection", "virt_error", "watch_close"]

#: Keepalive probes every KEEPALIVE_INTERVAL s; the connection is dead after KEEPALIVE_COUNT unanswered.
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3


def virt_error(error: libvirt.libvirtError, context: str = "") -> VirtError:
    """Translate a libvirtError into our tree, keeping libvirt's error code.

    The caller raises the result ``from error`` so the cause stays attached.
    """
    code = error.get_error_code()
    message = error.get_error_message() or str(error)
    if context:
        message = f"{context}: {message}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFoundError(message, code)
    return VirtError(message, code)


def ensure_event_impl() -> asyncio.AbstractEventLoop:
    """Register libvirtaio on the running loop once per process; return that loop.

    :raise VirtError: no loop is running, or libvirt's events already belong to
        another loop (one process, one loop: keep a single loop for its lifetime)
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError as e:
        raise VirtError("libvirt events need a running asyncio loop") from e
    impl = libvirtaio.getCurrentImpl()
    if impl is None:
        try:
            impl = libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
        except RuntimeError as e:
            # Someone registered another implementation (default impl, a thread).
            raise VirtError(f"libvirt event loop already registered elsewhere: {e}") from e
    bound: asyncio.AbstractEventLoop = impl.loop
    if bound is not loop:
        raise VirtError(
            "libvirt events are bound to another asyncio loop; libvirt allows only one "
            "event implementation per process, so use a single loop for all connections"
        )
    return loop


async def open_connection(uri: str) -> libvirt.virConnect:
    """Open ``uri`` read-write with libvirt events delivered on this loop.

    :param uri: e.g. ``qemu:///system`` or ``qemu:///system?socket=/path/libvirt-sock``
    :raise VirtError: the event loop cannot be bound, or libvirt refused to connect
    :return: the connection; close it with ``conn.close()`` (in a thread)
    """
    ensure_event_impl()
    try:
        conn: libvirt.virConnect = await asyncio.to_thread(libvirt.open, uri)
    except libvirt.libvirtError as e:
        raise virt_error(e, f"cannot connect to {uri}") from e
    return conn


def watch_close(conn: libvirt.virConnect, on_close: Callable[[str], None]) -> None:
    """Call ``on_close(reason)`` on the loop when the connection closes (libvirtd
    stopped or restarted, socket EOF, keepalive timeout). libvirt notices a dead
    peer that never closes the socket only through keepalive, so that is on too."""
    reasons = {libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error", libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "end of file",
               libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
               libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by us"}

    def callback(_conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        if reason != libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT:  # our own close: nothing lost
            on_close(reasons.get(reason, f"reason {reason}"))

    try:
        conn.registerCloseCallback(callback, None)
        conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
    except libvirt.libvirtError as e:
        raise virt_error(e, "cannot watch the libvirt connection") from e


def is_alive(conn: libvirt.virConnect) -> bool:
    """False once the connection is closed (blocking: call in a thread)."""
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


async def close_connection(conn: libvirt.virConnect) -> None:
    """Close a connection opened by :func:`open_connection`; errors are moot then."""
    try:
        await asyncio.to_thread(conn.close)
    except libvirt.libvirtError:
        pass
