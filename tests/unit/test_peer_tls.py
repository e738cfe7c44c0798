"""The peer API's mutual TLS on loopback: pinned certificates only, callers named by certificate,
and every request checked against the replica it is about."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from plugin import keys, peer
from plugin.config import Config
from plugin.daemon import Agent
from plugin.domain import PeerSpec, Protection
from plugin.errors import PluginError
from plugin.keys import KeysDir
from plugin.replication.secondary import PeerForbiddenError, PeerRequestError, Secondary
from plugin.state import Store
from tests.fakes.fake_qmp import FakeQmp

pytestmark = pytest.mark.skipif(not keys.shutil.which("openssl"), reason="needs the openssl CLI")

UUID = "0f6b2d1e-6a4c-4d55-9a53-2b8f7a1c9e01"


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeysDir]:
    """Identities of pri, sec, and rogue (a valid certificate nobody pinned)."""
    root = tmp_path_factory.mktemp("ids")
    out = {}
    for name in ("pri", "sec", "dr2", "rogue"):
        kd = KeysDir(str(root / name), name, gid=False)
        kd.ensure_identity()
        out[name] = kd
    return out


def pem(kd: KeysDir) -> str:
    return Path(kd.cert_path).read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client(ids: dict[str, KeysDir], me: str, server: str, port: int, *, pin: str | None = None) -> peer.PeerClient:
    """``me`` calling ``server``, pinning ``pin``'s certificate as the server's (default: the server's)."""
    ctx = peer.client_context(ids[me].cert_path, ids[me].key_path, pem(ids[pin or server]))
    return peer.PeerClient(PeerSpec(server, "127.0.0.1", port), ctx, timeout=5)


async def serve(ids: dict[str, KeysDir], handlers: dict[str, Any], pinned: list[str],
                body: Callable[[int], Awaitable[None]]) -> None:
    """Run ``sec``'s peer API pinning ``pinned`` for the duration of ``body(port)``."""
    pins = {ids[n].fingerprint(): n for n in pinned}
    app = peer.make_app(handlers, peer.tls_identity(pins))  # type: ignore[arg-type]
    port = free_port()
    ctx = peer.server_context(ids["sec"].cert_path, ids["sec"].key_path, [pem(ids[n]) for n in pinned])
    runner = await peer.start_server(app, "127.0.0.1", port, ctx)
    try:
        await body(port)
    finally:
        await runner.cleanup()


def whoami_handlers(calls: list[str]) -> dict[str, Any]:
    async def whoami(body: dict[str, Any], caller: str) -> str:
        calls.append(caller)
        return caller

    return {"whoami": whoami}


def test_pinned_peer_is_named_by_its_certificate(ids: dict[str, KeysDir]) -> None:
    calls: list[str] = []

    async def body(port: int) -> None:
        for me in ("pri", "dr2"):
            c = client(ids, me, "sec", port)
            try:
                assert await c.call("whoami", {}) == me
            finally:
                await c.close()

    asyncio.run(serve(ids, whoami_handlers(calls), ["pri", "dr2"], body))
    assert calls == ["pri", "dr2"]


def test_unknown_certificate_gets_nothing(ids: dict[str, KeysDir]) -> None:
    """A certificate nobody pinned (and no certificate at all) fails the handshake: no handler runs."""
    calls: list[str] = []

    async def body(port: int) -> None:
        rogue = client(ids, "rogue", "sec", port)
        try:
            with pytest.raises(peer.PeerError):
                await rogue.call("whoami", {})
        finally:
            await rogue.close()
        anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anonymous.check_hostname = False
        anonymous.load_verify_locations(cadata=pem(ids["sec"]))
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.post(f"https://127.0.0.1:{port}/v1/whoami", json={}, ssl=anonymous) as resp:
                    await resp.read()
            # Plain HTTP to the TLS port: no answer either.
            with pytest.raises(aiohttp.ClientError):
                async with session.post(f"http://127.0.0.1:{port}/v1/whoami", json={}) as resp:
                    await resp.read()

    asyncio.run(serve(ids, whoami_handlers(calls), ["pri"], body))
    assert calls == []


def test_server_with_another_certificate_is_refused(ids: dict[str, KeysDir]) -> None:
    """The client accepts only the certificate pinned for that peer (an impostor at its address fails)."""
    calls: list[str] = []

    async def body(port: int) -> None:
        c = client(ids, "pri", "sec", port, pin="rogue")
        try:
            with pytest.raises(peer.PeerAuthError, match="not the one pinned"):
                await c.call("whoami", {})
        finally:
            await c.close()

    asyncio.run(serve(ids, whoami_handlers(calls), ["pri"], body))
    assert calls == []


def test_unusable_peer_says_why() -> None:
    c = peer.PeerClient(PeerSpec("sec", "127.0.0.1", 1), None, unusable="no certificate pinned for peer sec")

    async def go() -> None:
        with pytest.raises(peer.PeerAuthError, match="no certificate pinned"):
            await c.call("health", {})

    asyncio.run(go())


def test_plain_api_names_callers_by_address_only_for_insecure_peers() -> None:
    calls: list[str] = []

    async def go(spec: PeerSpec) -> Any:
        app = peer.make_app(whoami_handlers(calls), peer.address_identity([spec]))
        port = free_port()
        runner = await peer.start_server(app, "127.0.0.1", port, None)
        c = peer.PeerClient(PeerSpec("sec", "127.0.0.1", port), None, timeout=5)
        try:
            return await c.call("whoami", {})
        finally:
            await c.close()
            await runner.cleanup()

    assert asyncio.run(go(PeerSpec("pri", "127.0.0.1", 8441, insecure_plain=True))) == "pri"
    with pytest.raises(peer.PeerError, match="not a known peer"):
        asyncio.run(go(PeerSpec("pri", "127.0.0.1", 8441)))
    assert calls == ["pri"]


def test_config_tls_is_the_default() -> None:
    assert Config(name="a", listen_host="127.0.0.1", listen_port=1).tls
    cfg = Config(name="a", listen_host="127.0.0.1", listen_port=1,
                 peers={"b": PeerSpec("b", "127.0.0.2", 1), "c": PeerSpec("c", "127.0.0.3", 1)})
    assert cfg.tls
    plain = Config(name="a", listen_host="127.0.0.1", listen_port=1,
                   peers={"b": PeerSpec("b", "127.0.0.2", 1, insecure_plain=True)})
    assert not plain.tls


# -- requests checked against the authenticated peer ---------------------------------------

class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.cfg = Config(name="sec", listen_host="127.0.0.1", listen_port=8441, state_dir=str(tmp_path / "state"),
                          storage=str(tmp_path / "replicas"))
        self.store = Store(self.cfg.db_path)
        self.qmp = FakeQmp()  # no command scripted: any QMP command would fail the test
        self.sec = Secondary(self.cfg, self.store, self.qmp)
        agent = Agent(self.cfg)
        agent.secondary = self.sec
        agent.store = self.store
        self.handlers = agent._peer_handlers()
        self.store.add_protection(UUID, "secondary", "web01", Protection(peer="pri"))

    def call(self, op: str, body: dict[str, Any], caller: str) -> Any:
        return asyncio.run(self.handlers[op](body, caller))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


@pytest.mark.parametrize("op, body", [
    ("info", {"uuid": UUID}),
    ("open_cycle", {"uuid": UUID, "seq": 1, "kind": "full", "targets": ["vda"]}),
    ("commit_cycle", {"uuid": UUID, "seq": 1, "cut_time": 1.0, "bytes": {"vda": 0}}),
    ("abort_cycle", {"uuid": UUID, "seq": 1}),
    ("remove", {"uuid": UUID, "keep_replica": False}),
    ("retire", {"uuid": UUID, "target": "vda"}),
    ("prepare", {"uuid": UUID, "domain": "web01", "primary": "dr2", "disks": [{"target": "vda", "size": 1 << 20}]}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_only_the_owner_acts_on_a_replica(env: Env, op: str, body: dict[str, Any]) -> None:
    with pytest.raises(PeerForbiddenError, match="belongs to pri"):
        env.call(op, body, "dr2")
    assert env.qmp.commands() == []
    assert env.store.protection(UUID, "secondary")["peer"] == "pri"


def test_a_peer_speaks_only_for_itself(env: Env) -> None:
    other = "7d3f0c9a-1b2e-4c5d-8e9f-0a1b2c3d4e5f"
    with pytest.raises(PeerRequestError, match="only prepare replicas of its own"):
        env.call("prepare", {"uuid": other, "domain": "x", "primary": "pri",
                             "disks": [{"target": "vda", "size": 1 << 20}]}, "dr2")
    assert env.store.protection(other, "secondary") is None


def test_owner_passes_the_check(env: Env) -> None:
    info = env.call("info", {"uuid": UUID}, "pri")
    assert info["protected"] is True
    assert env.call("health", {}, "dr2")["name"] == "sec"


def test_over_the_wire(ids: dict[str, KeysDir], env: Env) -> None:
    """The real handlers behind mutual TLS: dr2 (pinned, authenticated) still cannot touch pri's replica."""
    async def body(port: int) -> None:
        dr2, pri = client(ids, "dr2", "sec", port), client(ids, "pri", "sec", port)
        try:
            # The refusals arrive as their own types (plugin.errcodec), not as a bare PeerError.
            with pytest.raises(PeerForbiddenError, match="^peer sec refused info: .*belongs to pri"):
                await dr2.call("info", {"uuid": UUID})
            with pytest.raises(PeerRequestError, match="only prepare replicas of its own"):
                await dr2.call("prepare", {"uuid": UUID, "domain": "web01", "primary": "pri", "disks": []})
            assert (await pri.call("info", {"uuid": UUID}))["protected"] is True
        finally:
            await dr2.close()
            await pri.close()

    asyncio.run(serve(ids, env.handlers, ["pri", "dr2"], body))


def test_errors_are_plugin_errors() -> None:
    assert issubclass(peer.PeerAuthError, PluginError) and issubclass(PeerForbiddenError, PluginError)
