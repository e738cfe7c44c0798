"""The daemon <-> CLI socket protocol on real Unix sockets: replies, error mapping, hostile
input, socket permissions, stale sockets and progress streams. No daemon: a small handler."""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugin import ipc
from plugin.domain import Pair, PairState
from plugin.errors import (
    ConfigError,
    DaemonUnavailableError,
    DomainNotFoundError,
    PluginError,
    StateConflictError,
)


class CustomError(PluginError):
    """A daemon-side error the client does not know."""

    exit_code = 3


class ServerThread:
    """ipc.serve() on its own event loop in a thread, so sync clients (and cli.main) can call it."""

    def __init__(self, path: Path, handler: ipc.Handler, **kwargs: Any) -> None:
        self.path = str(path)
        self.handler = handler
        self.kwargs = kwargs
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            ipc.serve(self.path, self.handler, **self.kwargs), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Events:
    closed = threading.Event()


async def counting(n: int) -> AsyncIterator[object]:
    for i in range(n):
        yield {"target": "vda", "bytes_done": i, "bytes_total": n}


async def failing() -> AsyncIterator[object]:
    yield {"step": 1}
    raise DomainNotFoundError("domain 'web1' vanished")


async def endless() -> AsyncIterator[object]:
    try:
        while True:
            yield {"tick": time.monotonic()}
            await asyncio.sleep(0.01)
    finally:
        Events.closed.set()


async def handler(op: str, args: dict[str, Any]) -> object:
    if op == "echo":
        return {"op": op, "args": args}
    if op == "missing":
        raise DomainNotFoundError(f"domain {args['domain']!r} not found", code=42)
    if op == "config":
        raise ConfigError("no [peers] in the config")
    if op == "conflict":
        raise StateConflictError("pair vda is suspended", state=PairState.SUSPENDED, required=("active",))
    if op == "custom":
        raise CustomError("something new")
    if op == "boom":
        raise KeyError("x")
    if op == "sleep":
        await asyncio.sleep(args["seconds"])
        return None
    if op == "pair":
        return Pair("uuid", "web1", "vda", "dr1", PairState.ACTIVE, last_marker=7)
    if op == "unserializable":
        return object()
    if op == "nan":
        return float("nan")
    if op == "progress":
        return counting(args["n"])
    if op == "failing":
        return failing()
    if op == "endless":
        Events.closed.clear()
        return endless()
    raise ipc.UnknownOperationError(f"unknown operation {op!r}")


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[str]:
    with ServerThread(tmp_path / "s.sock", handler) as server:
        yield server.path


class Raw:
    """A byte-level client, for what the real client would never send."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict[str, Any] | None:
        """The next reply, or None when the server closed the connection."""
        try:
            line = self.file.readline()
        except ConnectionResetError:
            return None
        if not line:
            return None
        assert line.endswith(b"\n")
        reply = json.loads(line)
        assert isinstance(reply, dict)
        return reply

    def ask(self, data: bytes) -> dict[str, Any] | None:
        self.send(data + b"\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def line(message: object) -> bytes:
    return json.dumps(message).encode()


def assert_bad_request(reply: dict[str, Any] | None, fragment: str) -> None:
    assert reply is not None
    assert reply["v"] == 1 and reply["ok"] is False
    assert reply["error"]["type"] == "BadRequestError"
    assert reply["error"]["exit_code"] == 2
    assert fragment in reply["error"]["message"]


# ----------------------------------------------------------------------------- round trips

def test_round_trip(sock: str) -> None:
    assert ipc.request(sock, "echo", {"domain": "web1", "n": [1, 2]}) == {
        "op": "echo", "args": {"domain": "web1", "n": [1, 2]}}


def test_wire_shapes_and_several_requests_per_connection(sock: str) -> None:
    raw = Raw(sock)
    assert raw.ask(line({"v": 1, "op": "echo", "args": {"a": 1}})) == {
        "v": 1, "ok": True, "result": {"op": "echo", "args": {"a": 1}}}
    assert raw.ask(line({"v": 1, "op": "echo"})) == {"v": 1, "ok": True, "result": {"op": "echo", "args": {}}}
    assert raw.ask(line({"v": 1, "op": "missing", "args": {"domain": "web9"}})) == {
        "v": 1, "ok": False, "error": {"type": "DomainNotFoundError", "message": "domain 'web9' not found",
                                       "exit_code": 1, "details": {"code": 42}}}
    # Two requests in one write: two replies, in order.
    raw.send(line({"v": 1, "op": "echo", "args": {"i": 1}}) + b"\n" + line({"v": 1, "op": "echo", "args": {"i": 2}}) + b"\n")
    first, second = raw.reply(), raw.reply()
    assert first and first["result"]["args"] == {"i": 1}
    assert second and second["result"]["args"] == {"i": 2}
    raw.close()


def test_dataclasses_and_enums_are_sent_as_json(sock: str) -> None:
    result = ipc.request(sock, "pair", {})
    assert isinstance(result, dict)
    assert result["state"] == "active" and result["last_marker"] == 7 and result["target"] == "vda"


# ----------------------------------------------------------------------------- errors

def test_plugin_errors_come_back_as_themselves(sock: str) -> None:
    with pytest.raises(DomainNotFoundError) as e:
        ipc.request(sock, "missing", {"domain": "web9"})
    assert str(e.value) == "domain 'web9' not found"
    assert e.value.code == 42 and e.value.exit_code == 1

    with pytest.raises(ConfigError) as c:
        ipc.request(sock, "config", {})
    assert c.value.exit_code == 2

    with pytest.raises(StateConflictError) as s:
        ipc.request(sock, "conflict", {})
    assert (s.value.state, s.value.required) == ("suspended", ["active"])


def test_unknown_operation_is_a_bad_request(sock: str) -> None:
    with pytest.raises(ipc.UnknownOperationError, match="unknown operation 'frobnicate'") as e:
        ipc.request(sock, "frobnicate", {})
    assert e.value.exit_code == 2
    assert isinstance(e.value, ipc.BadRequestError)


def test_unknown_error_types_keep_their_name_and_exit_code(sock: str) -> None:
    with pytest.raises(ipc.RemoteError) as e:
        ipc.request(sock, "custom", {})
    assert (e.value.type_name, str(e.value), e.value.exit_code) == ("CustomError", "something new", 3)


def test_unexpected_exceptions_become_internal_errors_and_are_logged(sock: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="virtsync.ipc"):
        with pytest.raises(ipc.RemoteError) as e:
            ipc.request(sock, "boom", {})
    assert e.value.type_name == "InternalError"
    assert str(e.value) == "internal error: KeyError('x')"
    assert e.value.exit_code == 1
    records = [r for r in caplog.records if r.name == "virtsync.ipc"]
    assert records and records[0].exc_info is not None
    # ...and the server still serves.
    assert ipc.request(sock, "echo", {}) == {"op": "echo", "args": {}}


@pytest.mark.parametrize("op", ["unserializable", "nan"])
def test_a_result_that_is_not_json_is_an_internal_error(sock: str, op: str) -> None:
    raw = Raw(sock)
    reply = raw.ask(line({"v": 1, "op": op, "args": {}}))
    assert reply and reply["ok"] is False and reply["error"]["type"] == "InternalError"
    assert raw.ask(line({"v": 1, "op": "echo", "args": {}})) is not None
    raw.close()


@pytest.mark.parametrize(("data", "fragment"), [
    (b"not json", "not JSON"),
    (b"{\"v\": 1, \"op\": \"echo\"", "not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"", "empty line"),
    (b"   ", "empty line"),
    (b"[1, 2]", "not a JSON object"),
    (b"null", "not a JSON object"),
    (b'{"op": "echo", "args": {}}', "unsupported protocol version"),
    (b'{"v": 2, "op": "echo", "args": {}}', "unsupported protocol version 2"),
    (b'{"v": "1", "op": "echo", "args": {}}', "unsupported protocol version"),
    (b'{"v": true, "op": "echo", "args": {}}', "unsupported protocol version"),
    (b'{"v": 1.0, "op": "echo", "args": {}}', "unsupported protocol version"),
    (b'{"v": 1, "args": {}}', "'op' must be a non-empty string"),
    (b'{"v": 1, "op": "", "args": {}}', "'op' must be a non-empty string"),
    (b'{"v": 1, "op": 7, "args": {}}', "'op' must be a non-empty string"),
    (b'{"v": 1, "op": "echo", "args": []}', "'args' must be a JSON object"),
    (b'{"v": 1, "op": "echo", "args": null}', "'args' must be a JSON object"),
    (b'{"v": 1, "op": "echo", "args": "x"}', "'args' must be a JSON object"),
    (b"[" * 100_000, "nested deeper than 32 levels"),
])
def test_malformed_requests_get_an_error_and_the_connection_goes_on(sock: str, data: bytes, fragment: str) -> None:
    raw = Raw(sock)
    assert_bad_request(raw.ask(data), fragment)
    reply = raw.ask(line({"v": 1, "op": "echo", "args": {}}))
    assert reply and reply["ok"] is True
    raw.close()


def test_a_request_of_exactly_the_limit_is_served(sock: str) -> None:
    request = line({"v": 1, "op": "echo", "args": {}})
    request += b" " * (ipc.MAX_REQUEST - len(request))
    raw = Raw(sock)
    reply = raw.ask(request)
    assert reply and reply["ok"] is True
    raw.close()


def test_an_oversized_request_is_refused_and_the_connection_closed(sock: str) -> None:
    raw = Raw(sock)
    try:
        raw.send(b"x" * (ipc.MAX_REQUEST + 10) + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may hang up before it has read everything
    reply = raw.reply()
    if reply is not None:   # the reply can be lost to a reset when unread bytes remain
        assert_bad_request(reply, "request too large")
        assert raw.reply() is None
    raw.close()
    assert ipc.request(sock, "echo", {}) == {"op": "echo", "args": {}}


def test_an_oversized_line_without_newline_is_refused(sock: str) -> None:
    raw = Raw(sock)
    raw.send(b"{" * (ipc.MAX_REQUEST + 1))
    assert_bad_request(raw.reply(), "request too large")
    assert raw.reply() is None
    raw.close()


def test_a_last_line_without_newline_is_answered_at_eof(sock: str) -> None:
    raw = Raw(sock)
    raw.send(line({"v": 1, "op": "echo", "args": {}}))
    raw.sock.shutdown(socket.SHUT_WR)
    reply = raw.reply()
    assert reply and reply["ok"] is True
    raw.close()


def test_idle_connections_are_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipc, "IDLE_TIMEOUT", 0.2)
    with ServerThread(tmp_path / "s.sock", handler) as server:
        raw = Raw(server.path)
        assert raw.reply() is None
        raw.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                 max_leaves=20).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"v": st.integers(0, 3) | st.booleans() | st.none(),
                           "op": st.sampled_from(["echo", "", "missing", "nope"]) | st.integers(),
                           "args": st.none() | st.lists(st.integers(), max_size=2) | st.dictionaries(
                               st.text(max_size=5), st.integers(), max_size=3)}).map(lambda d: json.dumps(d).encode()),
))
def test_arbitrary_lines_get_a_json_reply_or_a_close_and_the_server_keeps_serving(sock: str, data: bytes) -> None:
    raw = Raw(sock)
    try:
        for part in data.split(b"\n"):
            reply = raw.ask(part)
            if reply is None:
                break
            assert reply["v"] == 1 and isinstance(reply["ok"], bool)
            if reply["ok"]:
                assert "result" in reply
            else:
                assert set(reply["error"]) >= {"type", "message", "exit_code"}
                assert isinstance(reply["error"]["exit_code"], int)
    finally:
        raw.close()
    assert ipc.request(sock, "echo", {"after": True}) == {"op": "echo", "args": {"after": True}}


# ----------------------------------------------------------------------------- progress

def test_progress_items_then_the_last_as_result(sock: str) -> None:
    seen: list[object] = []
    result = ipc.request(sock, "progress", {"n": 3}, on_progress=seen.append)
    assert seen == [{"target": "vda", "bytes_done": i, "bytes_total": 3} for i in range(3)]
    assert result == {"target": "vda", "bytes_done": 2, "bytes_total": 3}


def test_progress_wire_shape(sock: str) -> None:
    raw = Raw(sock)
    raw.send(line({"v": 1, "op": "progress", "args": {"n": 2}}) + b"\n")
    replies = [raw.reply() for _ in range(3)]
    assert replies == [
        {"v": 1, "ok": True, "progress": {"target": "vda", "bytes_done": 0, "bytes_total": 2}},
        {"v": 1, "ok": True, "progress": {"target": "vda", "bytes_done": 1, "bytes_total": 2}},
        {"v": 1, "ok": True, "result": {"target": "vda", "bytes_done": 1, "bytes_total": 2}},
    ]
    raw.close()


def test_an_empty_stream_gives_null(sock: str) -> None:
    seen: list[object] = []
    assert ipc.request(sock, "progress", {"n": 0}, on_progress=seen.append) is None
    assert seen == []


def test_an_error_mid_stream_ends_it_with_the_error(sock: str) -> None:
    seen: list[object] = []
    with pytest.raises(DomainNotFoundError, match="vanished"):
        ipc.request(sock, "failing", {}, on_progress=seen.append)
    assert seen == [{"step": 1}]


def test_a_client_that_leaves_mid_stream_closes_the_iterator(sock: str) -> None:
    raw = Raw(sock)
    raw.send(line({"v": 1, "op": "endless", "args": {}}) + b"\n")
    reply = raw.reply()
    assert reply and "progress" in reply
    raw.close()
    assert Events.closed.wait(5)
    assert ipc.request(sock, "echo", {}) == {"op": "echo", "args": {}}


# ----------------------------------------------------------------------------- client side

def test_daemon_down_no_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    with pytest.raises(DaemonUnavailableError) as e:
        ipc.request(path, "status", {})
    assert str(e.value) == f"virtsync daemon is not running (no socket at {path})"
    assert e.value.exit_code == 1


def test_daemon_down_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    with pytest.raises(DaemonUnavailableError, match="not running"):
        ipc.request(path, "status", {})


def test_a_silent_daemon_times_out(sock: str) -> None:
    started = time.monotonic()
    with pytest.raises(DaemonUnavailableError, match="did not answer 'sleep' within 0.2 s"):
        ipc.request(sock, "sleep", {"seconds": 3}, timeout=0.2)
    assert time.monotonic() - started < 2


def test_a_malformed_reply_is_an_ipc_error(tmp_path: Path) -> None:
    path = str(tmp_path / "liar.sock")

    async def main() -> None:
        async def liar(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b"{\"v\": 1, \"ok\": \"yes\"}\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(liar, path)
        async with server:
            with pytest.raises(ipc.IpcError, match="malformed reply"):
                await ipc.call(path, "status", {})

    asyncio.run(main())


# ----------------------------------------------------------------------------- the socket file

def test_socket_is_0660_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with ServerThread(tmp_path / "s.sock", handler) as server:
            mode = stat.S_IMODE(os.stat(server.path).st_mode)
            assert stat.S_ISSOCK(os.stat(server.path).st_mode)
            assert mode == 0o660
            assert not mode & stat.S_IWOTH
    finally:
        os.umask(old)


def test_socket_mode_is_configurable_but_never_world_writable(tmp_path: Path) -> None:
    with ServerThread(tmp_path / "s.sock", handler, mode=0o600) as server:
        assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    with pytest.raises(ConfigError, match="world-writable"):
        asyncio.run(ipc.serve(str(tmp_path / "w.sock"), handler, mode=0o666))
    assert not (tmp_path / "w.sock").exists()


def test_socket_group(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    own = grp.getgrgid(os.getgid()).gr_name
    with ServerThread(tmp_path / "s.sock", handler, group=own) as server:
        assert os.stat(server.path).st_gid == os.getgid()
    with caplog.at_level(logging.WARNING, logger="virtsync.ipc"):
        with ServerThread(tmp_path / "t.sock", handler, group="vs-no-such-group") as server:
            assert ipc.request(server.path, "echo", {}) == {"op": "echo", "args": {}}
    assert "vs-no-such-group" in caplog.text


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    with ServerThread(path, handler) as server:
        assert ipc.request(server.path, "echo", {}) == {"op": "echo", "args": {}}


def test_a_live_socket_is_not_stolen(sock: str) -> None:
    with pytest.raises(ipc.IpcError, match="in use by a running daemon"):
        asyncio.run(ipc.serve(sock, handler))
    assert ipc.request(sock, "echo", {}) == {"op": "echo", "args": {}}


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    path.write_text("precious")
    with pytest.raises(ipc.IpcError, match="not a socket"):
        asyncio.run(ipc.serve(str(path), handler))
    assert path.read_text() == "precious"


def test_a_missing_directory_is_an_ipc_error(tmp_path: Path) -> None:
    with pytest.raises(ipc.IpcError, match="cannot listen"):
        asyncio.run(ipc.serve(str(tmp_path / "no" / "s.sock"), handler))
