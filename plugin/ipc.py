"""Versioned JSON lines over a Unix socket: the daemon serves, the CLI and the hook call.

One request per line, one reply per request; several requests may share a connection::

    -> {"v": 1, "op": "pairs", "args": {"domain": "web1"}}
    <- {"v": 1, "ok": true, "result": {...}}
    <- {"v": 1, "ok": false, "error": {"type": "DomainNotFoundError", "message": "...",
                                        "exit_code": 1, "details": {"code": 42}}}

A handler may return an async iterator instead of a value: every item goes out as
``{"v": 1, "ok": true, "progress": item}`` and the last item (or null) is repeated as the
final ``result``. An error while streaming ends the stream with an error reply.

The server never trusts a line: it is bounded to :data:`MAX_REQUEST` bytes, must be UTF-8
JSON with the right version, and any failure becomes an error reply instead of a crash.
The client turns error replies back into the matching :class:`~plugin.errors.PluginError`
subclass, so ``cli.main`` prints and exits the same way for local and remote errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import grp
import inspect
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

from plugin import errcodec, jsonin
from plugin.errcodec import RemoteError
from plugin.errors import ConfigError, DaemonUnavailableError, PluginError

__all__ = [
    "MAX_REQUEST",
    "PROTOCOL_VERSION",
    "BadRequestError",
    "Handler",
    "IpcError",
    "RemoteError",
    "UnknownOperationError",
    "call",
    "check_socket_path",
    "remove_own_socket",
    "request",
    "serve",
]

PROTOCOL_VERSION = 1
#: Longest request line the server reads (the newline not counted); longer is refused.
MAX_REQUEST = 1 << 20
#: Longest reply line the client reads: replies list every pair, so they may be big.
MAX_REPLY = 64 << 20
#: A connection silent this long between requests is closed, so dead clients cannot pile up.
IDLE_TIMEOUT = 300.0
#: A client that does not read its replies for this long is dropped.
WRITE_TIMEOUT = 30.0
#: How long the stale-socket probe waits for an answer before assuming the socket is alive.
PROBE_TIMEOUT = 1.0

log = logging.getLogger("virtsync.ipc")

#: The sockets this process bound, by path: (st_dev, st_ino) at bind, so that it removes only
#: its own (never another agent's socket, nor a file someone put there since).
_bound: dict[str, tuple[int, int]] = {}

Handler = Callable[[str, dict[str, Any]], Awaitable[object] | AsyncIterator[object]]
"""``handler(op, args)``: a coroutine giving the result, or an async iterator of progress items."""


class IpcError(PluginError):
    """The IPC channel itself failed: socket in use, broken reply, connection lost."""


class BadRequestError(IpcError):
    """The request is malformed, too large, of another version, or names no known operation."""

    exit_code: ClassVar[int] = 2


class UnknownOperationError(BadRequestError):
    """The daemon has no operation of that name; handlers raise it for unknown ``op``."""


Operation = Callable[[dict[str, Any]], Awaitable[Any]]
"""One operation's handler: its arguments in, its result (or an async iterator) out."""


class Router:
    """The one table of the agent's operations: each service registers its own, and a
    request goes to the service that registered its ``op``. Usable as a :data:`Handler`."""

    def __init__(self) -> None:
        self._ops: dict[str, Operation] = {}

    def register(self, ops: dict[str, Operation]) -> None:
        """:raise ValueError: an operation registered twice (a wiring mistake)"""
        for name, handler in ops.items():
            if name in self._ops:
                raise ValueError(f"operation {name!r} registered twice")
            self._ops[name] = handler

    def names(self) -> list[str]:
        return sorted(self._ops)

    async def __call__(self, op: str, args: dict[str, Any]) -> Any:
        handler = self._ops.get(op)
        if handler is None:
            raise UnknownOperationError(f"unknown operation {op!r}")
        return await handler(args)


# ----------------------------------------------------------------------------- encoding

def _default(obj: object) -> object:
    """Let handlers return the domain's dataclasses and Enums directly."""
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _encode(message: dict[str, Any]) -> bytes:
    """One compact JSON line; NaN and Infinity are refused because they are not JSON."""
    return json.dumps(message, default=_default, allow_nan=False, separators=(",", ":")).encode() + b"\n"


def _error_reply(exc: PluginError, type_name: str | None = None) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "ok": False, "error": errcodec.encode(exc, type_name)}


def _internal_reply(exc: BaseException) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "ok": False, "error": errcodec.encode_internal(exc)}


# ----------------------------------------------------------------------------- server

def _parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """Validate one request line.

    :raise BadRequestError: for anything but ``{"v": 1, "op": str, "args": {...}}``
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestError("malformed request: not UTF-8") from None
    if not text.strip():
        raise BadRequestError("malformed request: empty line")
    try:
        message = jsonin.loads(text)
    except jsonin.JsonInputError as e:
        raise BadRequestError(f"malformed request: {e}") from None
    if not isinstance(message, dict):
        raise BadRequestError("malformed request: not a JSON object")
    version = message.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # True == 1, so compare the type too
        raise BadRequestError(f"unsupported protocol version {json.dumps(version)[:20]}; "
                              f"this daemon speaks version {PROTOCOL_VERSION}")
    op = message.get("op")
    if not isinstance(op, str) or not op:
        raise BadRequestError("malformed request: 'op' must be a non-empty string")
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise BadRequestError("malformed request: 'args' must be a JSON object")
    return op, args


class _Connection:
    """One client connection: read a line, answer it, repeat until EOF or a fatal error."""

    def __init__(self, handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handler = handler
        self.reader = reader
        self.writer = writer

    async def send(self, message: dict[str, Any]) -> None:
        try:
            data = _encode(message)
        except (TypeError, ValueError) as e:
            log.error("reply is not JSON serializable", exc_info=True)
            data = _encode(_internal_reply(e))
        self.writer.write(data)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await self.writer.drain()

    async def run(self) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        line = await self.reader.readline()
                except ValueError:
                    # StreamReader raises ValueError once a line exceeds its limit (MAX_REQUEST);
                    # the rest of that line cannot be framed reliably, so answer and hang up.
                    await self.send(_error_reply(BadRequestError(f"request too large (limit {MAX_REQUEST} bytes)")))
                    return
                if not line:
                    return
                await self.answer(line)
        except (TimeoutError, ConnectionError):
            pass  # idle, too slow to read, or gone: nothing to tell anyone
        except Exception:
            log.error("connection handler failed", exc_info=True)
        finally:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def answer(self, line: bytes) -> None:
        try:
            op, args = _parse_request(line)
        except BadRequestError as e:
            log.debug("bad request: %s", e)
            await self.send(_error_reply(e))
            return
        log.debug("request %s", op)
        try:
            pending = self.handler(op, args)
            outcome: object = await pending if inspect.isawaitable(pending) else pending
        except PluginError as e:
            log.debug("%s failed: %s: %s", op, type(e).__name__, e)
            await self.send(_error_reply(e))
            return
        except Exception as e:
            log.error("%s failed with an unexpected error", op, exc_info=True)
            await self.send(_internal_reply(e))
            return
        if isinstance(outcome, AsyncIterator):
            await self.stream(outcome)
        else:
            await self.send({"v": PROTOCOL_VERSION, "ok": True, "result": outcome})

    async def stream(self, items: AsyncIterator[object]) -> None:
        """Forward progress items; if the client goes away, close the iterator (GeneratorExit in it)."""
        last: object = None
        try:
            while True:
                try:
                    last = await anext(items)
                except StopAsyncIteration:
                    break
                except PluginError as e:
                    await self.send(_error_reply(e))
                    return
                except Exception as e:
                    log.error("progress stream failed with an unexpected error", exc_info=True)
                    await self.send(_internal_reply(e))
                    return
                await self.send({"v": PROTOCOL_VERSION, "ok": True, "progress": last})
            await self.send({"v": PROTOCOL_VERSION, "ok": True, "result": last})
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.error("closing the progress stream failed", exc_info=True)


def check_socket_path(path: str) -> None:
    """Refuse, before anything starts, a socket path that exists and is not a socket.

    :raise IpcError: one line naming the path
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise IpcError(f"socket path {path}: {e.strerror or e}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise IpcError(f"{path} exists and is not a socket: refusing to use or replace it (agent.socket)")


def remove_own_socket(path: str) -> bool:
    """Unlink ``path`` if it is still the socket this process bound there (same inode, nobody
    listening: call it after closing the server); else leave it.

    :return: whether it was removed
    """
    ident = _bound.pop(path, None)
    if ident is None:
        return False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    # An inode number is reused at once: someone's new socket may carry ours. Our server is
    # closed by now, so a socket that still accepts a connection is someone else's.
    if (st.st_dev, st.st_ino) != ident or not stat.S_ISSOCK(st.st_mode) or _accepts(path):
        log.warning("%s is no longer the socket this agent made: left in place", path)
        return False
    os.unlink(path)
    return True


def _accepts(path: str) -> bool:
    """Whether something listens on the Unix socket ``path`` (without waiting)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True   # a full backlog (EAGAIN) or no access: cannot tell, so it stays
    finally:
        probe.close()
    return True


async def _remove_stale_socket(path: str) -> None:
    """Remove ``path`` only if it is a socket nobody listens on.

    :raise IpcError: the path is a live socket or not a socket at all
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise IpcError(f"{path} exists and is not a socket; refusing to replace it")
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            _, writer = await asyncio.open_unix_connection(path)
    except ConnectionRefusedError:
        log.info("removing stale socket %s", path)
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except TimeoutError:
        raise IpcError(f"{path} is in use (a daemon is listening but busy)") from None
    writer.close()
    raise IpcError(f"{path} is in use by a running daemon")


def _chgrp(path: str, group: str) -> None:
    """Hand the socket to ``group``; without it mode 0660 only lets the owner in, which is safe."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("group %r does not exist; %s keeps the daemon's group", group, path)
        return
    try:
        os.chown(path, -1, gid)
    except OSError as e:
        log.warning("cannot give %s to group %r: %s", path, group, e.strerror)


async def serve(path: str, handler: Handler, *, mode: int = 0o660,
                group: str | None = None) -> asyncio.AbstractServer:
    """Listen on the Unix socket ``path`` and answer requests with ``handler(op, args)``.

    The socket is created under a umask so it is never, even briefly, more open than ``mode``.
    Python 3.11 does not unlink the socket on close: :func:`remove_own_socket` does, and the
    next start removes a socket left by a crash as stale.

    :param path: the socket path; its directory must exist
    :param handler: ``handler(op, args)``, see :data:`Handler`
    :param mode: permission bits of the socket; world-writable modes are refused
    :param group: group to own the socket (skipped with a warning if missing)
    :raise ConfigError: ``mode`` is world-writable
    :raise IpcError: the path is in use or cannot be bound
    :return: the started server
    """
    if mode & ~0o777 or mode & 0o002:
        raise ConfigError(f"socket mode {mode:#o} is invalid or world-writable")
    await _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
            bound = True
            st = os.lstat(path)
            _bound[path] = (st.st_dev, st.st_ino)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        if group:
            _chgrp(path, group)
        sock.setblocking(False)

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await _Connection(handler, reader, writer).run()
            except asyncio.CancelledError:
                # The outermost frame of the connection task, which nobody awaits: Python 3.11's
                # StreamReaderProtocol logs a cancelled callback task as an error, so end quietly.
                pass

        return await asyncio.start_unix_server(on_connect, sock=sock, limit=MAX_REQUEST)
    except BaseException as e:
        sock.close()
        if bound:
            try:
                remove_own_socket(path)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise IpcError(f"cannot listen on {path}: {e.strerror or e}") from e
        raise


# ----------------------------------------------------------------------------- client

def _rebuild_error(error: object) -> PluginError:
    """Turn the ``error`` object of a reply back into an exception (:mod:`plugin.errcodec`)."""
    if not isinstance(error, dict):
        return IpcError("malformed reply from the daemon: 'error' is not an object")
    return errcodec.decode(error)


def _parse_reply(line: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(line)
    except (ValueError, RecursionError):
        raise IpcError("malformed reply from the daemon: not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise IpcError("malformed reply from the daemon: not a reply object")
    if reply.get("v") != PROTOCOL_VERSION:
        raise IpcError(f"the daemon speaks protocol version {str(reply.get('v'))[:20]}, "
                       f"this client version {PROTOCOL_VERSION}")
    return reply


async def call(path: str, op: str, args: dict[str, Any], *, timeout: float | None = 30.0,
               on_progress: Callable[[object], None] | None = None) -> object:
    """Send one request and return its result.

    :param path: the daemon's socket
    :param op: operation name
    :param args: JSON-serializable arguments
    :param timeout: bound on connecting and on each wait for a reply line (progress included),
        so a long operation is fine as long as the daemon keeps streaming; None waits forever
    :param on_progress: called with each progress item
    :raise DaemonUnavailableError: no socket, nobody listening, no access, or no answer in time
    :raise PluginError: the error the daemon replied with (see :class:`RemoteError`)
    :raise IpcError: the reply is malformed or the connection dropped mid-request
    :return: the ``result`` of the reply
    """
    line = _encode({"v": PROTOCOL_VERSION, "op": op, "args": args})
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path, limit=MAX_REPLY)
    except (FileNotFoundError, ConnectionRefusedError):
        raise DaemonUnavailableError(f"virtsync daemon is not running (no socket at {path})") from None
    except PermissionError:
        raise DaemonUnavailableError(f"permission denied on {path} (is this user in the virtsync group?)") from None
    except TimeoutError:
        raise DaemonUnavailableError(f"virtsync daemon at {path} did not accept the connection") from None
    except (OSError, ValueError) as e:   # ValueError: a NUL in the path
        raise DaemonUnavailableError(f"cannot reach the virtsync daemon at {path!r}: {getattr(e, 'strerror', None) or e}") from None
    try:
        writer.write(line)
        while True:
            try:
                async with asyncio.timeout(timeout):
                    await writer.drain()
                    data = await reader.readline()
            except TimeoutError:
                raise DaemonUnavailableError(f"virtsync daemon did not answer {op!r} within {timeout:g} s") from None
            except ValueError:
                raise IpcError(f"reply from the daemon exceeds {MAX_REPLY} bytes") from None
            except ConnectionError as e:
                raise IpcError(f"connection to the daemon lost during {op!r}: {e}") from None
            if not data:
                raise IpcError(f"the daemon closed the connection without answering {op!r}")
            reply = _parse_reply(data)
            if not reply["ok"]:
                raise _rebuild_error(reply.get("error"))
            if "progress" in reply and "result" not in reply:
                if on_progress is not None:
                    on_progress(reply["progress"])
                continue
            return reply.get("result")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def request(path: str, op: str, args: dict[str, Any], *, timeout: float | None = 30.0,
            on_progress: Callable[[object], None] | None = None) -> object:
    """:func:`call` for synchronous callers (CLI, hook); must not run inside an event loop."""
    return asyncio.run(call(path, op, args, timeout=timeout, on_progress=on_progress))
