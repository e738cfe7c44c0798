"""The peer API between agents: JSON over HTTP, bound to the configured
address only. (Mutual TLS arrives with the security work; the transport is kept
in this one module so that it changes in one place.)

Every request names the domain it is about; the secondary checks it against
the pairs it holds, and refuses out-of-order or unknown cycles.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from .domain import PeerSpec
from .errors import PluginError

log = logging.getLogger("virtsync.peer")
MAX_BODY = 1 << 20
API = "/v1"


class PeerError(PluginError):
    """The peer could not be reached, or refused the request."""


class PeerUnreachableError(PeerError):
    """No answer from the peer (down, or the link is cut)."""


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def make_app(handlers: Mapping[str, Handler]) -> web.Application:
    """One POST route per operation: ``/v1/<op>`` with a JSON object body."""
    app = web.Application(client_max_size=MAX_BODY)

    def route(op: str, handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def serve(request: web.Request) -> web.Response:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError, web.HTTPRequestEntityTooLarge) as e:
                return web.json_response({"error": {"type": "BadRequest", "message": f"bad body: {e}"}}, status=400)
            if not isinstance(body, dict):
                return web.json_response({"error": {"type": "BadRequest", "message": "body must be an object"}},
                                         status=400)
            try:
                result = await handler(body)
            except PluginError as e:
                return web.json_response({"error": {"type": type(e).__name__, "message": str(e)}}, status=409)
            except (KeyError, TypeError, ValueError) as e:
                return web.json_response({"error": {"type": "BadRequest", "message": f"bad request: {e!r:.200}"}},
                                         status=400)
            except Exception as e:  # noqa: BLE001 - reported to the peer, logged here
                log.exception("peer op %s failed", op)
                return web.json_response({"error": {"type": "InternalError", "message": repr(e)[:300]}}, status=500)
            return web.json_response({"result": result})

        return serve

    for op, handler in handlers.items():
        app.router.add_post(f"{API}/{op}", route(op, handler))
    return app


async def start_server(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner


class PeerClient:
    """Calls one peer's API with bounded waits."""

    def __init__(self, spec: PeerSpec, *, timeout: float = 30.0) -> None:
        self.spec = spec
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def base(self) -> str:
        return f"http://{self.spec.address}:{self.spec.port}{API}"

    async def call(self, op: str, body: Mapping[str, Any], *, timeout: float | None = None) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(timeout or self.timeout):
                async with self._session.post(f"{self.base}/{op}", json=dict(body)) as resp:
                    data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise PeerUnreachableError(f"peer {self.spec.name} ({self.spec.address}:{self.spec.port}) "
                                       f"unreachable: {type(e).__name__} {e}".rstrip()) from e
        except json.JSONDecodeError as e:
            raise PeerError(f"peer {self.spec.name}: malformed reply") from e
        if not isinstance(data, dict):
            raise PeerError(f"peer {self.spec.name}: malformed reply")
        if "error" in data:
            err = data["error"] if isinstance(data["error"], dict) else {}
            raise PeerError(f"peer {self.spec.name} refused {op}: {err.get('message', '?')}")
        return data.get("result")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
