"""Issue 21 items 3, 5 and 6: every bad local input ends in one line naming the thing and the
rule, a non-zero exit, and loses nothing; start-up removes only what it made.

Where a space of inputs fits (numbers, nesting depths, paths, labels), hypothesis walks it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from plugin import config, daemon, ipc, jsonin, keys, paths, peer
from plugin.config import Config
from plugin.daemon import Agent, Protected
from plugin.domain import MAX_LABEL, PeerSpec, label_problem
from plugin.errors import ConfigError, PluginError
from plugin.keys import KeyFileError, KeysDir
from plugin.replication.secondary import PeerRequestError, _check_marker_fields
from plugin.requests import UsageError

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
needs_openssl = pytest.mark.skipif(not keys.shutil.which("openssl"), reason="needs the openssl CLI")


def one_line(e: BaseException) -> str:
    message = str(e)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    return message


def agent_toml(tmp_path: Path, **agent: str) -> Path:
    """A config whose state, socket and keys live under ``tmp_path`` (plain links: no keys needed)."""
    keys_ = {"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "agent.sock"),
             "keys_dir": str(tmp_path / "keys"), **agent}
    lines = ["[agent]", 'name = "pri"', 'listen = "127.0.0.1:8441"',
             *(f"{k} = {json.dumps(v)}" for k, v in keys_.items()),
             "[peers.sec]", 'address = "127.0.0.2:8441"', "insecure_plain = true"]
    path = tmp_path / "virtsync.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def virtsyncd(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``virtsyncd ARGV`` in-process: (exit code, its stderr, which must be one line)."""
    capsys.readouterr()
    code = daemon.main(list(argv))
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return code, err.strip()


# -- the config file ------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "a = " + "[" * 5000 + "]" * 5000,
    "a = " + "[" * 100_000,
    "a = " + "{b = " * 5000 + "1" + "}" * 5000,
], ids=["5000 nested arrays", "100000 unclosed", "5000 nested inline tables"])
def test_deeply_nested_toml_is_one_line(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(text, "/etc/virtsync/deep.toml")
    message = one_line(info.value)
    assert message.startswith("/etc/virtsync/deep.toml: ") and ("nested too deeply" in message or "TOML" in message)


def _journal(key: str, value: float) -> str:
    text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    return f'[agent]\nname = "pri"\nlisten = "127.0.0.1:8441"\n[journal]\n{key} = {text}\n'


@SETTINGS
@given(key=st.sampled_from(["apply_delay", "retain_seconds"]),
       value=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**6, 10**6).map(float))
@example(key="apply_delay", value=math.nan)
@example(key="retain_seconds", value=-5.0)
def test_journal_durations_are_finite_and_not_negative(key: str, value: float) -> None:
    text = _journal(key, value)
    if math.isfinite(value) and value >= 0:
        assert getattr(config.parse(text, "/c.toml"), key) == value
        return
    with pytest.raises(ConfigError) as info:
        config.parse(text, "/c.toml")
    assert f"journal.{key} must be a finite number of seconds >= 0" in one_line(info.value)


def test_tracker_interval_nan_is_refused() -> None:
    with pytest.raises(ConfigError, match="agent.tracker_interval must be a finite number"):
        config.parse('[agent]\nname = "pri"\nlisten = "127.0.0.1:8441"\ntracker_interval = nan\n', "/c.toml")


def test_config_that_is_a_fifo_is_refused_without_waiting(tmp_path: Path) -> None:
    """Opening a FIFO for reading waits for a writer: the agent hung. Run apart, so a hang fails."""
    fifo = tmp_path / "virtsync.toml"
    os.mkfifo(fifo)
    res = subprocess.run([sys.executable, "-m", "plugin.daemon", "--config", str(fifo)], capture_output=True,
                         text=True, timeout=60, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert (res.returncode, res.stderr.strip()) == (
        2, f"ConfigError: cannot read config {fifo}: not a regular file"), res


def test_config_that_is_a_device_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot read config /dev/zero: not a regular file"):
        config.load("/dev/zero")


# -- start-up: paths, lock, socket ------------------------------------------------------------

def test_state_dir_naming_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.write_text("mine\n")
    code, err = virtsyncd(capsys, "--config", str(agent_toml(tmp_path)))
    assert (code, err) == (2, f"ConfigError: agent.state_dir {state} is not a directory")
    assert state.read_text() == "mine\n"


def test_storage_naming_a_regular_file(tmp_path: Path) -> None:
    target = tmp_path / "replicas"
    target.write_text("mine\n")
    with pytest.raises(ConfigError) as info:
        paths.ensure_dir(str(target), "replication.storage")
    assert one_line(info.value) == f"replication.storage {target} is not a directory"
    assert target.read_text() == "mine\n"


@pytest.mark.parametrize("kind", ["file", "directory", "symlink", "fifo"])
def test_socket_path_that_is_not_a_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    """Refused at once, before the storage daemon or anything else starts; the thing stays."""
    sock = tmp_path / "agent.sock"
    if kind == "file":
        sock.write_text("keep\n")
    elif kind == "directory":
        sock.mkdir()
    elif kind == "symlink":
        (tmp_path / "elsewhere").write_text("keep\n")
        sock.symlink_to(tmp_path / "elsewhere")
    else:
        os.mkfifo(sock)
    before = os.lstat(sock)
    code, err = virtsyncd(capsys, "--config", str(agent_toml(tmp_path)))
    assert (code, err) == (1, f"IpcError: {sock} exists and is not a socket: refusing to use or replace it "
                              "(agent.socket)")
    after = os.lstat(sock)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert not (tmp_path / "state" / "run").exists(), "the storage daemon was started"


def test_a_second_agent_on_the_same_state_dir_touches_nothing(tmp_path: Path) -> None:
    """The lock is taken before anything else; its refusal stops nothing and removes nothing."""
    cfg = config.load(str(agent_toml(tmp_path)))
    first = Agent(cfg)
    first._take_lock()
    sock = tmp_path / "agent.sock"
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(sock))   # stands for the first agent's socket
    os.chmod(cfg.state_dir, 0o755)   # the second agent must not even tighten it
    try:
        second = Agent(cfg)

        async def start_then_stop() -> None:
            try:
                with pytest.raises(ConfigError, match=f"another virtsyncd already uses {cfg.state_dir}$"):
                    await second.start()
            finally:
                await second.stop()

        asyncio.run(start_then_stop())
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        assert stat.S_IMODE(os.stat(cfg.state_dir).st_mode) == 0o755
    finally:
        other.close()


def test_only_the_socket_this_process_bound_is_removed(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")

    async def handler(op: str, args: dict[str, Any]) -> object:
        return None

    async def main() -> None:
        server = await ipc.serve(path, handler, mode=0o600)
        server.close()
        await server.wait_closed()
        # Someone else's live socket takes the path meanwhile (often with our inode number):
        # not ours, left alone.
        os.unlink(path)
        squatter = socket.socket(socket.AF_UNIX)
        squatter.bind(path)
        squatter.listen()
        try:
            assert ipc.remove_own_socket(path) is False
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
        finally:
            squatter.close()
            os.unlink(path)
        # A regular file put there meanwhile stays too.
        server = await ipc.serve(path, handler, mode=0o600)
        server.close()
        await server.wait_closed()
        os.unlink(path)
        Path(path).write_text("keep\n")
        assert ipc.remove_own_socket(path) is False and Path(path).read_text() == "keep\n"
        os.unlink(path)
        # Its own closed socket goes, once.
        server = await ipc.serve(path, handler, mode=0o600)
        server.close()
        await server.wait_closed()
        assert ipc.remove_own_socket(path) is True and not os.path.exists(path)
        assert ipc.remove_own_socket(path) is False

    asyncio.run(main())
    assert ipc.remove_own_socket(str(tmp_path / "never-bound.sock")) is False


@needs_openssl
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o757, 0o722])
def test_keys_dir_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    """As ssh's StrictModes: anyone who can write there can swap the pinned certificate."""
    kd = KeysDir(str(tmp_path / "keys"), "pri", gid=False)
    kd.ensure_identity()
    os.chmod(kd.path, mode)
    with pytest.raises(KeyFileError) as info:
        kd.check_identity()
    assert one_line(info.value) == (f"{kd.path} is writable by others (mode {mode:04o}): anyone could replace "
                                    "its keys; chmod 0700 it")
    os.chmod(kd.path, 0o700)
    kd.check_identity()


@needs_openssl
def test_peer_dir_writable_by_others_is_refused(pri_keys: KeysDir) -> None:
    kd = pri_keys
    kd.peer("sec")
    os.chmod(kd.peer_dir("sec"), 0o777)
    with pytest.raises(KeyFileError, match=f"{kd.peer_dir('sec')} is writable by others"):
        kd.peer("sec")


# -- JSON from outside: the IPC and the peer API ----------------------------------------------

def nested(depth: int, inner: str = "1") -> str:
    opening = "".join("[" if i % 2 else '{"a":' for i in range(depth))
    closing = "".join("]" if i % 2 else "}" for i in reversed(range(depth)))
    return opening + inner + closing


@SETTINGS
@given(depth=st.integers(0, 3000), inner=st.sampled_from(["1", '"[[[{{{"', '"\\\\"', "null"]))
@example(depth=jsonin.MAX_DEPTH, inner="1")
@example(depth=jsonin.MAX_DEPTH + 1, inner="1")
def test_json_nesting_is_bounded(depth: int, inner: str) -> None:
    text = nested(depth, inner)
    if depth <= jsonin.MAX_DEPTH:
        assert jsonin.loads(text) == json.loads(text)   # brackets inside strings do not count
        return
    with pytest.raises(jsonin.JsonInputError) as info:
        jsonin.loads(text)
    assert one_line(info.value) == f"nested deeper than {jsonin.MAX_DEPTH} levels"


def test_ipc_refuses_deep_nesting_in_one_line() -> None:
    line = ('{"v": 1, "op": "status", "args": ' + nested(5000) + "}").encode()
    with pytest.raises(ipc.BadRequestError) as info:
        ipc._parse_request(line)
    assert one_line(info.value) == f"malformed request: nested deeper than {jsonin.MAX_DEPTH} levels"


def test_peer_api_answers_deep_nesting_and_big_bodies_with_400(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[dict[str, Any]] = []

    async def echo(body: dict[str, Any], caller: str) -> str:
        calls.append(body)
        return caller

    spec = PeerSpec("pri", "127.0.0.1", 0, insecure_plain=True)

    async def main() -> list[tuple[int, Any]]:
        app = peer.make_app({"echo": echo}, peer.address_identity([spec]))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        runner = await peer.start_server(app, "127.0.0.1", port, None)
        out = []
        try:
            async with aiohttp.ClientSession() as session:
                for body in (b"[" * 100_000, nested(5000).encode(), b'{"a": "' + b"x" * (peer.MAX_BODY + 1) + b'"}',
                             b'{"ok": ' + nested(3).encode() + b"}"):
                    async with session.post(f"http://127.0.0.1:{port}/v1/echo", data=body) as resp:
                        out.append((resp.status, await resp.json()))
        finally:
            await runner.cleanup()
        return out

    deep, deep_mixed, big, fine = asyncio.run(main())
    for status, reply in (deep, deep_mixed):
        assert status == 400 and reply["error"]["message"] == f"bad body: nested deeper than {jsonin.MAX_DEPTH} levels"
    assert big[0] == 400 and big[1]["error"]["message"] == f"bad body: larger than {peer.MAX_BODY} bytes"
    assert fine == (200, {"result": "pri"}) and len(calls) == 1
    assert "RecursionError" not in caplog.text and "Traceback" not in caplog.text


def test_a_peers_deep_or_huge_reply_is_a_peer_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client side of the same limits: a hostile peer cannot raise RecursionError here."""
    from aiohttp import web

    monkeypatch.setattr(peer, "MAX_REPLY", 1 << 16)   # the rule, at a size a unit test can send

    replies = {"deep": b'{"result": ' + nested(5000).encode() + b"}", "huge": b" " * (peer.MAX_REPLY + 10),
               "fine": b'{"result": [1, [2]]}'}

    async def main() -> dict[str, str]:
        async def reply(request: web.Request) -> web.Response:
            return web.Response(body=replies[request.match_info["op"]])

        app = web.Application()
        app.router.add_post("/v1/{op}", reply)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        runner = await peer.start_server(app, "127.0.0.1", port, None)
        client = peer.PeerClient(PeerSpec("sec", "127.0.0.1", port, insecure_plain=True), None, timeout=30)
        out = {}
        try:
            for op in ("deep", "huge"):
                with pytest.raises(peer.PeerError) as info:
                    await client.call(op, {})
                out[op] = one_line(info.value)
            out["fine"] = json.dumps(await client.call("fine", {}))
        finally:
            await client.close()
            await runner.cleanup()
        return out

    out = asyncio.run(main())
    assert out == {"deep": f"peer sec: malformed reply to deep: nested deeper than {jsonin.MAX_DEPTH} levels",
                   "huge": f"peer sec: reply to huge larger than {peer.MAX_REPLY} bytes",
                   "fine": "[1, [2]]"}


# -- restore --to ------------------------------------------------------------------------------

@pytest.mark.parametrize(("dest", "rule"), [
    ("/proc/self/cwd/x", "/proc is a kernel filesystem, not storage"),
    ("/proc", "/proc is a kernel filesystem, not storage"),
    ("/sys/kernel/x", "/sys is a kernel filesystem, not storage"),
    ("/dev/shm/../null", "/dev is a kernel filesystem, not storage"),
    ("/tmp/a\0b", "a path cannot hold a NUL character"),
    ("relative/dir", "--to must be an absolute path"),
])
def test_restore_targets_refused(dest: str, rule: str) -> None:
    with pytest.raises(UsageError) as info:
        paths.check_restore_target(dest)
    message = one_line(info.value)
    assert rule in message and (repr(dest) if "\0" in dest else dest) in message


def test_restore_into_a_regular_file_a_symlink_to_proc_or_a_full_directory(tmp_path: Path) -> None:
    regular = tmp_path / "image"
    regular.write_text("keep\n")
    with pytest.raises(UsageError, match=f"--to {regular} exists and is not a directory"):
        paths.check_restore_target(str(regular))
    link = tmp_path / "link"
    link.symlink_to("/proc/self")
    with pytest.raises(UsageError, match="/proc is a kernel filesystem"):
        paths.check_restore_target(str(link / "out"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "vda.qcow2").write_text("old")
    with pytest.raises(UsageError, match=f"--to {full} is not empty: restore never overwrites"):
        paths.check_restore_target(str(full))
    paths.check_restore_target(str(tmp_path / "new" / "dir"))   # made by restore
    empty = tmp_path / "empty"
    empty.mkdir()
    paths.check_restore_target(str(empty))
    assert regular.read_text() == "keep\n" and (full / "vda.qcow2").read_text() == "old"


@SETTINGS
@given(dest=st.text(min_size=0, max_size=40))
@example(dest="/proc/1/mem")
@example(dest="\0")
def test_any_restore_target_is_accepted_or_refused_in_one_line(dest: str) -> None:
    try:
        paths.check_restore_target(dest)
    except UsageError as e:
        assert (repr(dest) if not dest.isprintable() else dest) in one_line(e)
    else:
        assert os.path.isabs(dest) and "\0" not in dest
        assert not any(os.path.realpath(dest).startswith(top) for top in paths.KERNEL_FILESYSTEMS)


# -- mark labels: one rule, checked before a cycle is cut ------------------------------------------

@SETTINGS
@given(label=st.text(max_size=MAX_LABEL + 20))
@example(label="x" * (MAX_LABEL + 1))
@example(label="line\nbreak")
def test_the_primary_and_the_secondary_share_the_label_rule(label: str) -> None:
    problem = label_problem(label)
    assert (problem is None) == (len(label) <= MAX_LABEL and label.isprintable())
    if problem is None:
        _check_marker_fields(label, 1.0)
    else:
        with pytest.raises(PeerRequestError, match="a label is at most 128 printable characters"):
            _check_marker_fields(label, 1.0)


class _NeverCycles:
    """A replicator whose cycle must not run: the refused label is caught before."""

    async def cycle(self, **kw: Any) -> None:
        raise AssertionError("a cycle was cut for a refused label")


@pytest.mark.parametrize("label", ["x" * (MAX_LABEL + 1), "tab\there", "\x00"])
def test_op_mark_refuses_a_bad_label_before_queueing_a_cycle(tmp_path: Path, label: str) -> None:
    cfg = Config(name="pri", listen_host="127.0.0.1", listen_port=8441, state_dir=str(tmp_path / "state"))
    agent = Agent(cfg)

    async def main() -> None:
        task = asyncio.create_task(asyncio.sleep(3600))   # a running supervisor
        prot = Protected("u-1", "vsr", _NeverCycles(), None)  # type: ignore[arg-type]
        prot.task = task
        agent.protected["u-1"] = prot
        try:
            with pytest.raises(UsageError) as info:
                await agent.op_mark({"domain": "vsr", "label": label})
            assert "a label is at most 128 printable characters" in one_line(info.value)
            assert prot.marks == [] and not prot.wake.is_set()
        finally:
            task.cancel()

    asyncio.run(main())


def test_errors_here_are_plugin_errors() -> None:
    for cls in (ConfigError, KeyFileError, UsageError, ipc.IpcError, PeerRequestError):
        assert issubclass(cls, PluginError)
