"""The peer API between agents: JSON over HTTPS with mutual TLS, bound to the
configured address only. The transport lives in this one module.

Each agent has its own key and self-signed certificate; each peer's certificate
is pinned (:mod:`plugin.keys`). Both ends use the standard library's ``ssl``:
TLS 1.3 only, ``CERT_REQUIRED``, and the pinned certificates as the only trust
anchors, so a peer with any other certificate, or none, fails the handshake and
gets nothing. Host names are not checked: the pin is the identity. The server
then names the caller by its certificate's fingerprint and hands that name to
the handler, which checks the request against it (``prepare`` from the primary
it names, cycle operations only from the peer owning the replica).

Plain HTTP only for peers set ``insecure_plain = true`` (isolated replication
networks); the caller is then the peer whose configured address the request
comes from.

Every request names the domain it is about; the secondary checks it against
the pairs it holds, and refuses out-of-order or unknown cycles.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, ClassVar

import aiohttp
from aiohttp import web

from . import errcodec, jsonin
from .domain import PeerSpec
from .errors import ConfigError, JournalError, PluginError, StateConflictError
from .keys import fingerprint_der
from .replication.limits import AmbiguousNameError, PeerRequestError
from .replication.storage_daemon import StorageDaemonError
from .requests import UsageError

log = logging.getLogger("virtsync.peer")
MAX_BODY = 1 << 20
#: Longest reply this side reads from a peer (``info`` lists every marker).
MAX_REPLY = 64 << 20
API = "/v1"


class PeerError(PluginError):
    """The peer could not be reached, or refused the request."""


class PeerUnreachableError(PeerError):
    """No answer from the peer (down, or the link is cut)."""


class PeerAuthError(PeerError):
    """The TLS handshake failed: a certificate that is not the pinned one, on either side
    (or, on a plain link, the request came from an address of no known peer)."""


class PeerBadRequestError(PeerError):
    """The peer could not read the request: not a JSON object, too large, or a wrong field."""

    exit_code: ClassVar[int] = 2


#: What a peer's refusal may arrive as; any other type (a refused cut, an unreachable peer:
#: errors that steer this agent's own control flow) arrives as a RemoteError.
PEER_REFUSALS: tuple[type[PluginError], ...] = (
    PeerAuthError, PeerBadRequestError, PeerRequestError, AmbiguousNameError, StateConflictError, JournalError,
    StorageDaemonError, UsageError, ConfigError)


def _refusal(exc: PluginError, status: int) -> web.Response:
    """An error reply of the peer API: the error object of :mod:`plugin.errcodec`."""
    return web.json_response({"error": errcodec.encode(exc)}, status=status)


Handler = Callable[[dict[str, Any], str], Awaitable[Any]]
"""``handler(body, caller)``: ``caller`` is the authenticated peer's name."""
Identify = Callable[[web.Request], "str | None"]
"""The peer a request comes from, or None: that request gets a 403 and nothing else."""


def server_context(cert: str, key: str, peer_certs: Iterable[str]) -> ssl.SSLContext:
    """Server side of mutual TLS: this agent's identity; the pinned peer certificates (PEM
    texts) as the only trust anchors; a client certificate required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    pems = "".join(p.strip() + "\n" for p in peer_certs)
    if pems:  # with no trust anchor at all every client is refused, which is right
        ctx.load_verify_locations(cadata=pems)
    return ctx


def client_context(cert: str, key: str, peer_cert: str) -> ssl.SSLContext:
    """Client side: present this agent's certificate; accept only the peer's pinned one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the pinned certificate is the identity, not a DNS name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cadata=peer_cert.strip() + "\n")
    return ctx


def tls_identity(pins: Mapping[str, str]) -> Identify:
    """Name the caller by its verified certificate: ``pins`` maps fingerprints
    (:func:`plugin.keys.fingerprint_der`) to peer names."""
    def identify(request: web.Request) -> str | None:
        transport = request.transport
        sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        return pins.get(fingerprint_der(der)) if der else None

    return identify


def address_identity(peers: Iterable[PeerSpec]) -> Identify:
    """Plain HTTP (``insecure_plain`` peers only): the caller is the peer at the source address."""
    by_address = {p.address: p.name for p in peers if p.insecure_plain}

    def identify(request: web.Request) -> str | None:
        return by_address.get(request.remote or "")

    return identify


def make_app(handlers: Mapping[str, Handler], identify: Identify) -> web.Application:
    """One POST route per operation: ``/v1/<op>`` with a JSON object body."""
    app = web.Application(client_max_size=MAX_BODY)

    def route(op: str, handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def serve(request: web.Request) -> web.Response:
            caller = identify(request)
            if caller is None:
                log.warning("peer API: refused %s from %s: not a known peer", op, request.remote)
                return _refusal(PeerAuthError("not a known peer"), 403)
            try:
                body = jsonin.loads(await request.read())   # at most MAX_BODY bytes, MAX_DEPTH levels
            except (jsonin.JsonInputError, web.HTTPRequestEntityTooLarge) as e:
                message = f"bad body: {e}" if isinstance(e, jsonin.JsonInputError) else \
                    f"bad body: larger than {MAX_BODY} bytes"
                return _refusal(PeerBadRequestError(message), 400)
            if not isinstance(body, dict):
                return _refusal(PeerBadRequestError("body must be an object"), 400)
            try:
                result = await handler(body, caller)
            except PluginError as e:
                return _refusal(e, 409)
            except (KeyError, TypeError, ValueError) as e:
                return _refusal(PeerBadRequestError(f"bad request: {e!r:.200}"), 400)
            except Exception as e:  # noqa: BLE001 - reported to the peer, logged here
                log.exception("peer op %s failed", op)
                return web.json_response({"error": errcodec.encode_internal(e)}, status=500)
            return web.json_response({"result": result})

        return serve

    for op, handler in handlers.items():
        app.router.add_post(f"{API}/{op}", route(op, handler))
    return app


async def start_server(app: web.Application, host: str, port: int,
                       ssl_context: ssl.SSLContext | None) -> web.AppRunner:
    """Serve ``app`` on ``host:port``: HTTPS with ``ssl_context``, plain HTTP with None."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
    await site.start()
    return runner


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first ``limit`` bytes: a peer's reply never fills this agent's memory."""
    data = bytearray()
    while len(data) < limit:
        chunk = await resp.content.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


class PeerClient:
    """Calls one peer's API with bounded waits; HTTPS with ``ssl_context``, plain HTTP with None."""

    def __init__(self, spec: PeerSpec, ssl_context: ssl.SSLContext | None, *, timeout: float = 30.0,
                 unusable: str = "") -> None:
        """:param unusable: why this peer cannot be called (its keys are missing): every call says so"""
        self.spec = spec
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.unusable = unusable
        self._session: aiohttp.ClientSession | None = None

    @property
    def base(self) -> str:
        scheme = "http" if self.ssl_context is None else "https"
        host = f"[{self.spec.address}]" if ":" in self.spec.address else self.spec.address
        return f"{scheme}://{host}:{self.spec.port}{API}"

    async def call(self, op: str, body: Mapping[str, Any], *, timeout: float | None = None) -> Any:
        if self.unusable:
            raise PeerAuthError(f"peer {self.spec.name}: {self.unusable}")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        where = f"{self.spec.address}:{self.spec.port}"
        try:
            async with asyncio.timeout(timeout or self.timeout):
                async with self._session.post(f"{self.base}/{op}", json=dict(body),
                                              ssl=self.ssl_context if self.ssl_context is not None else True) as resp:
                    raw = await _read_bounded(resp, MAX_REPLY + 1)
            if len(raw) > MAX_REPLY:
                raise PeerError(f"peer {self.spec.name}: reply to {op} larger than {MAX_REPLY} bytes")
            data = jsonin.loads(raw)
        except aiohttp.ClientConnectorCertificateError as e:
            raise PeerAuthError(f"peer {self.spec.name} ({where}) presented a certificate that is not the one "
                                f"pinned for it: {e.certificate_error}") from e
        except aiohttp.ClientSSLError as e:
            raise PeerAuthError(f"TLS with peer {self.spec.name} ({where}) failed: {e}") from e
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            # TLS 1.3 checks our certificate after the client's handshake: a peer that does not
            # pin it just hangs up, which looks like this.
            hint = (" (if it is up: does it pin this host's certificate?)"
                    if self.ssl_context is not None and isinstance(e, aiohttp.ServerDisconnectedError) else "")
            raise PeerUnreachableError(f"peer {self.spec.name} ({where}) unreachable: "
                                       f"{type(e).__name__} {e}".rstrip() + hint) from e
        except jsonin.JsonInputError as e:
            raise PeerError(f"peer {self.spec.name}: malformed reply to {op}: {e}") from e
        if not isinstance(data, dict):
            raise PeerError(f"peer {self.spec.name}: malformed reply")
        if "error" in data:
            # The peer's refusal as its own type (a StateConflictError stays one, with .state and
            # .required), so a caller can tell one refusal from another.
            if not isinstance(data["error"], dict):
                raise PeerError(f"peer {self.spec.name} refused {op}: malformed error")
            raise errcodec.decode(data["error"], prefix=f"peer {self.spec.name} refused {op}: ",
                                  allowed=PEER_REFUSALS)
        return data.get("result")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
