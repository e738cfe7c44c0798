"""plugin.errcodec: one error codec for the IPC and the peer API; an error arrives as its own
type with its structured attributes when this side knows the type, as RemoteError otherwise."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from plugin import errcodec, ipc, peer
from plugin.domain import PeerSpec
from plugin.errors import ConfigError, PluginError, StateConflictError, VirtError
from plugin.replication.secondary import JournalFullError, PeerForbiddenError, PeerRequestError
from tests.unit.test_cli import imports_of
from tests.unit.test_exit_codes import error_classes, instance
from tests.unit.test_ipc import ServerThread

ROOT = Path(__file__).resolve().parents[2]


def over_the_wire(exc: PluginError) -> PluginError:
    return errcodec.decode(json.loads(json.dumps(errcodec.encode(exc))))


@pytest.mark.parametrize("name", sorted(error_classes()))
def test_every_error_class_round_trips_as_itself(name: str) -> None:
    cls = error_classes()[name]
    sent = instance(cls)
    got = over_the_wire(sent)
    assert type(got) is cls
    assert str(got) == "boom" and got.exit_code == sent.exit_code
    assert vars(got) == vars(sent)      # the structured attributes (.state, .code, .type_name ...)


def test_every_error_class_is_known_by_name() -> None:
    known = errcodec.known_types()
    for name, cls in error_classes().items():
        if cls is not errcodec.RemoteError:
            assert known[name] is cls


def test_structured_attributes_survive() -> None:
    got = over_the_wire(StateConflictError("pair is primary", state="primary", required=["secondary", "idle"]))
    assert isinstance(got, StateConflictError)
    assert (got.state, got.required) == ("primary", ["secondary", "idle"])
    got = over_the_wire(VirtError("no such domain", 42))
    assert isinstance(got, VirtError) and got.code == 42


def test_an_unknown_type_is_a_remote_error_keeping_name_and_code() -> None:
    got = errcodec.decode({"type": "SomeNewerError", "message": "boom", "exit_code": 7, "details": {"x": 1}})
    assert type(got) is errcodec.RemoteError and got.type_name == "SomeNewerError"
    assert (str(got), got.exit_code) == ("boom", 7)
    # ... and it goes on under the name it came with.
    assert errcodec.encode(got)["type"] == "SomeNewerError"
    assert errcodec.decode({})      # nothing usable: still an error, never a crash
    assert type(errcodec.decode({"type": 5, "message": "m"})) is errcodec.RemoteError


def test_details_cannot_shadow_methods_or_the_exit_code() -> None:
    got = errcodec.decode({"type": "ConfigError", "message": "m", "exit_code": "x",
                           "details": {"with_traceback": 1, "__class__": "x", "args": [1], "exit_code": 9,
                                       "1bad": 2, "key": "kept"}})
    assert type(got) is ConfigError and got.exit_code == ConfigError.exit_code   # bad code: the class's
    assert callable(got.with_traceback) and got.args == ("m",) and vars(got) == {"key": "kept"}
    assert errcodec.decode({"type": "ConfigError", "message": "m", "exit_code": 300}).exit_code == 2


def test_the_codec_imports_only_the_stdlib_and_errors() -> None:
    import sys
    for module in imports_of(ROOT / "plugin" / "errcodec.py"):
        assert module.split(".")[0] in sys.stdlib_module_names or module == "plugin.errors", module


# ----------------------------------------------------------------------------- both links

def test_ipc_error_arrives_typed(tmp_path: Path) -> None:
    async def handler(op: str, args: dict[str, Any]) -> object:
        raise JournalFullError("journal of web1 is full")

    with ServerThread(tmp_path / "s.sock", handler) as server, pytest.raises(JournalFullError, match="is full"):
        ipc.request(server.path, "pairs", {})


def peer_refusals(handlers: dict[str, peer.Handler], calls: dict[str, Any],
                  identify: peer.Identify = lambda request: "pri") -> dict[str, PluginError]:
    """Serve ``handlers`` on a plain loopback peer API; each call's error, by op."""
    async def main() -> dict[str, PluginError]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        runner = await peer.start_server(peer.make_app(handlers, identify), "127.0.0.1", port, None)
        client = peer.PeerClient(PeerSpec("sec", "127.0.0.1", port, insecure_plain=True), None, timeout=30)
        out: dict[str, PluginError] = {}
        try:
            for op, body in calls.items():
                with pytest.raises(PluginError) as info:
                    await client.call(op, body)
                out[op] = info.value
        finally:
            await client.close()
            await runner.cleanup()
        return out

    return asyncio.run(main())


def test_a_peer_refusal_arrives_as_its_own_type() -> None:
    async def is_primary(body: dict[str, Any], caller: str) -> None:
        raise StateConflictError("web1 is primary here", state="primary", required="secondary")

    async def full(body: dict[str, Any], caller: str) -> None:
        raise JournalFullError("journal of web1 is full")

    async def forbidden(body: dict[str, Any], caller: str) -> None:
        raise PeerForbiddenError("belongs to dr2")

    async def bug(body: dict[str, Any], caller: str) -> None:
        raise RuntimeError("oops")

    async def needs_uuid(body: dict[str, Any], caller: str) -> None:
        body["uuid"]

    out = peer_refusals({"promote": is_primary, "open_cycle": full, "info": forbidden, "bug": bug,
                         "retire": needs_uuid},
                        {"promote": {}, "open_cycle": {}, "info": {}, "bug": {}, "retire": {}})
    # Failover can tell "peer is primary" from "journal full".
    got = out["promote"]
    assert type(got) is StateConflictError and (got.state, got.required) == ("primary", "secondary")
    assert str(got) == "peer sec refused promote: web1 is primary here"
    assert type(out["open_cycle"]) is JournalFullError
    assert type(out["info"]) is PeerForbiddenError and isinstance(out["info"], PeerRequestError)
    assert out["info"].exit_code == 2
    assert type(out["bug"]) is errcodec.RemoteError and out["bug"].type_name == errcodec.INTERNAL
    assert "RuntimeError('oops')" in str(out["bug"])
    assert type(out["retire"]) is peer.PeerBadRequestError and "bad request: KeyError('uuid')" in str(out["retire"])
    assert out["retire"].exit_code == 2


def test_the_peer_apis_own_refusals_are_typed() -> None:
    async def fine(body: dict[str, Any], caller: str) -> None:
        return None

    out = peer_refusals({"fine": fine}, {"fine": {}}, identify=lambda request: None)
    assert type(out["fine"]) is peer.PeerAuthError and "not a known peer" in str(out["fine"])


def test_a_peer_cannot_raise_our_control_flow_errors() -> None:
    """A refused cut steers the supervisor ("marker refused", not a failed cycle), an
    unreachable peer makes the pairs disconnected: a peer's reply must not pass for either."""
    from plugin.replication.primary import CutRefusedError, CycleError

    async def refused_cut(body: dict[str, Any], caller: str) -> None:
        raise CutRefusedError("no guest agent")

    async def unreachable(body: dict[str, Any], caller: str) -> None:
        raise peer.PeerUnreachableError("cannot reach dr2")

    out = peer_refusals({"open_cycle": refused_cut, "info": unreachable}, {"open_cycle": {}, "info": {}})
    for op, name in (("open_cycle", "CutRefusedError"), ("info", "PeerUnreachableError")):
        got = out[op]
        assert type(got) is errcodec.RemoteError and got.type_name == name, (op, got)
        assert not isinstance(got, (CycleError, peer.PeerUnreachableError))
    # The same objects on the local socket keep their types: only the peer link limits them.
    assert type(over_the_wire(CutRefusedError("no guest agent"))) is CutRefusedError
