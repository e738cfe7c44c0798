"""The libvirt hook (``hooks/qemu``) run as libvirt runs it, and its install/spool helpers.

The hook is a subprocess with a (large) XML on stdin, against a fake agent socket that
answers, refuses, stays silent or says no; every case checks the bytes sent or spooled, the
exit code, an empty stdout and the runtime.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin import cli, hook
from tests.unit.test_ipc import ServerThread

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "plugin" / "hooks" / "qemu"
OK_REPLY = b'{"v":1,"ok":true,"result":null}\n'
KEYS = ["domain", "op", "sub_op", "extra", "time", "host_pid"]
#: Not a speed check (bench/hook_runtime.py measures speed): a bound that proves the hook
#: never hangs libvirt, generous enough for a loaded 2-core machine.
FAST = 5.0
XML = "<domain type='qemu'><name>web1</name><description>" + "x" * (256 << 10) + "</description></domain>"


class FakeAgent:
    """A tiny unix-socket server in a thread: records each request line, then behaves as told.

    ``mode``: ``reply`` answers ok, ``error`` answers ok:false, ``silent`` reads and never
    answers, ``close`` hangs up without answering.
    """

    def __init__(self, path: str, mode: str = "reply") -> None:
        self.path = path
        self.mode = mode
        self.lines: list[bytes] = []
        self.received = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeAgent:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(5)
        for conn in self._held:
            conn.close()
        self.sock.close()
        os.unlink(self.path)

    def requests(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(2.0)
            data = b""
            try:
                while not data.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            self.lines.append(data)
            self.received.set()
            if self.mode == "silent":
                self._held.append(conn)   # keep it open: the hook must give up by itself
                continue
            if self.mode == "reply":
                conn.sendall(OK_REPLY)
            elif self.mode == "error":
                conn.sendall(b'{"v":1,"ok":false,"error":{"type":"UnknownOperationError",'
                             b'"message":"no operation hook","exit_code":2}}\n')
            conn.close()


class Setup:
    """An installed hook with a short socket path (sun_path holds 107 bytes) and a spool."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = str(base / "a.sock")
        self.spool = str(base / "state" / "hook-spool.jsonl")
        self.path = hook.install(str(base / "qemu.d"), socket_path=self.socket, spool=self.spool)

    def run(self, *argv: str, stdin: str = XML, timeout: float = 10.0) -> tuple[subprocess.CompletedProcess[bytes], float]:
        """Run the hook as libvirt does: argv, XML on a stdin pipe, nothing else in the environment."""
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": "/root"}
        started = time.monotonic()
        proc = subprocess.Popen([str(self.path), *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd="/")
        # Feed stdin from a thread like libvirt's poll loop: a hook that does not read must
        # still finish; the writer then sees EPIPE, which libvirt ignores (vircommand.c).
        broken: list[bool] = []

        def feed() -> None:
            try:
                assert proc.stdin is not None
                proc.stdin.write(stdin.encode())
                proc.stdin.close()
            except BrokenPipeError:
                broken.append(True)

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
        code = proc.wait(timeout)
        elapsed = time.monotonic() - started
        writer.join(5)
        return subprocess.CompletedProcess(proc.args, code, out, err), elapsed

    def spooled(self) -> list[dict[str, Any]]:
        with open(self.spool, "rb") as f:
            return [json.loads(line) for line in f.read().splitlines()]


@pytest.fixture
def setup() -> Iterator[Setup]:
    with tempfile.TemporaryDirectory(prefix="vs-hook-", dir="/tmp") as base:
        yield Setup(Path(base))


def check_event(event: dict[str, Any], argv: list[str], before: float) -> None:
    assert list(event) == KEYS
    assert [event["domain"], event["op"], event["sub_op"], event["extra"]] == argv
    assert before <= event["time"] <= time.time()
    assert event["host_pid"] == os.getpid()   # the hook's parent: here the test, under libvirt libvirtd


# ----------------------------------------------------------------------------- the hook, run

def test_agent_up_gets_one_request_and_nothing_is_spooled(setup: Setup) -> None:
    before = time.time()
    with FakeAgent(setup.socket) as agent:
        res, elapsed = setup.run("web1", "started", "begin", "-")
    assert (res.returncode, res.stdout, res.stderr) == (0, b"", b"")
    assert len(agent.lines) == 1
    line = agent.lines[0]
    assert line.endswith(b"}\n") and line.count(b"\n") == 1 and line.isascii()
    request = json.loads(line)
    assert list(request) == ["v", "op", "args"] and request["v"] == 1 and request["op"] == "hook"
    check_event(request["args"], ["web1", "started", "begin", "-"], before)
    assert not os.path.exists(setup.spool)
    assert elapsed < FAST


def test_agent_down_spools_the_same_object(setup: Setup) -> None:
    before = time.time()
    res, elapsed = setup.run("web1", "prepare", "begin", "-")
    assert (res.returncode, res.stdout, res.stderr) == (0, b"", b"")
    [event] = setup.spooled()
    check_event(event, ["web1", "prepare", "begin", "-"], before)
    assert stat.S_IMODE(os.stat(setup.spool).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(setup.spool)).st_mode) == 0o700
    assert elapsed < FAST

    res, _ = setup.run("web1", "start", "begin", "-")
    assert res.returncode == 0
    assert [e["op"] for e in setup.spooled()] == ["prepare", "start"]


def test_stale_socket_spools(setup: Setup) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(setup.socket)   # bound, never listening: ECONNREFUSED
    try:
        res, elapsed = setup.run("web1", "stopped", "end", "-")
    finally:
        sock.close()
    assert (res.returncode, res.stdout) == (0, b"")
    assert [e["op"] for e in setup.spooled()] == ["stopped"]
    assert elapsed < FAST


@pytest.mark.parametrize("mode", ["silent", "close", "error"])
def test_agent_that_does_not_answer_ok_gets_spooled(setup: Setup, mode: str) -> None:
    with FakeAgent(setup.socket, mode) as agent:
        res, elapsed = setup.run("web1", "release", "end", "-")
    assert (res.returncode, res.stdout, res.stderr) == (0, b"", b"")
    assert len(agent.lines) == 1
    [event] = setup.spooled()
    assert event == json.loads(agent.lines[0])["args"]
    if mode == "silent":
        assert 0.9 <= elapsed < 1.0 + FAST   # the 1 s budget, then the spool
    else:
        assert elapsed < FAST


def test_strange_arguments_stay_valid_json(setup: Setup) -> None:
    name = 'we"b\\1\n\tü'
    with FakeAgent(setup.socket) as agent:
        res, _ = setup.run(name, "migrate", "begin")   # a missing argument becomes "-"
        res2, _ = setup.run()
    assert res.returncode == res2.returncode == 0
    first, second = (r["args"] for r in agent.requests())
    assert (first["domain"], first["op"], first["sub_op"], first["extra"]) == (name, "migrate", "begin", "-")
    assert (second["domain"], second["op"]) == ("-", "-")


def test_unwritable_spool_still_exits_0(setup: Setup) -> None:
    os.makedirs(setup.spool)   # a directory where the spool file should be
    res, _ = setup.run("web1", "start", "begin", "-")
    assert (res.returncode, res.stdout) == (0, b"")
    assert res.stderr.startswith(b"virtsync hook: ")


def test_torn_spool_line_stays_apart(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    os.makedirs(os.path.dirname(setup.spool), 0o700)
    with open(setup.spool, "wb") as f:
        f.write(b'{"domain":"a","op":"start"}\n{"domain":"a","op":"sta')   # a hook killed mid-write
    res, _ = setup.run("web1", "started", "begin", "-")
    assert res.returncode == 0
    with caplog.at_level(logging.WARNING, logger="virtsync.hook"):
        events = hook.read_spool(setup.spool)
    assert [(e["domain"], e["op"]) for e in events] == [("a", "start"), ("web1", "started")]
    assert "malformed line 2" in caplog.text


def test_against_the_real_ipc_server(setup: Setup) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def handler(op: str, args: dict[str, Any]) -> object:
        seen.append((op, args))
        if args["domain"] == "refused":
            raise hook.HookInstallError("no")   # any error reply: the hook spools
        return None

    with ServerThread(Path(setup.socket), handler):
        res, elapsed = setup.run("web1", "started", "begin", "-")
        res2, _ = setup.run("refused", "started", "begin", "-")
    assert res.returncode == res2.returncode == 0
    assert [(op, a["domain"], a["op"]) for op, a in seen] == [("hook", "web1", "started"), ("hook", "refused", "started")]
    assert [e["domain"] for e in setup.spooled()] == ["refused"]
    assert elapsed < FAST


def test_hook_stays_small_and_never_touches_libvirt() -> None:
    source = TEMPLATE.read_text()
    tree = ast.parse(source)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"os", "sys", "time", "_json", "_socket", "fcntl"}
    assert "virsh" not in source
    # libvirt's XML stays unread: a hook that does not read must not block libvirt (test above).
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("stdin", "stdout")]
    assert len(source.splitlines()) <= 90   # STYLE.md §6: about 80 lines


def test_hook_imports_only_builtins_at_runtime(setup: Setup) -> None:
    """``-X importtime`` lists every module imported: no json, socket, re, site or libvirt."""
    res = subprocess.run([sys.executable, "-IS", "-X", "importtime", str(setup.path), "d", "start", "begin", "-"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=10)
    modules = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert {"json", "socket", "re", "site", "libvirt", "asyncio"}.isdisjoint(modules), modules


# ----------------------------------------------------------------------------- install / uninstall

def test_install_bakes_paths_shebang_and_mode(tmp_path: Path) -> None:
    directory = tmp_path / "hooks" / "qemu.d"
    path = hook.install(str(directory), socket_path="/run/x/agent.sock", spool="/var/lib/x/hook-spool.jsonl")
    assert path == directory / "virtsync"
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == f"#!{sys.executable} -IS"
    assert lines[1].startswith(hook.MARKER)
    assigned = {t.id: n.value.value for n in ast.parse(text).body if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    assert assigned["SOCKET"] == "/run/x/agent.sock"
    assert assigned["SPOOL"] == "/var/lib/x/hook-spool.jsonl"
    # Only the shebang and the two paths differ from the template.
    template = TEMPLATE.read_text().splitlines()
    assert [i for i, (a, b) in enumerate(zip(template, lines, strict=True)) if a != b] == [
        0, template.index('SOCKET = "/run/virtsync/agent.sock"'),
        template.index('SPOOL = "/var/lib/virtsync/hook-spool.jsonl"')]
    assert hook.is_ours(path)
    # Reinstalling over our own file is fine and leaves no temporary behind.
    hook.install(str(directory), socket_path="/run/y.sock", spool="/s/p")
    assert "SOCKET = '/run/y.sock'" in path.read_text()
    assert sorted(os.listdir(directory)) == ["virtsync"]


def test_install_refuses_a_foreign_file(tmp_path: Path) -> None:
    target = tmp_path / "virtsync"
    target.write_text("#!/bin/sh\necho someone else's\n")
    with pytest.raises(hook.HookInstallError, match="not written by virtsync"):
        hook.install(str(tmp_path), socket_path="/a", spool="/b")
    with pytest.raises(hook.HookInstallError, match="not written by virtsync"):
        hook.uninstall(str(tmp_path))
    assert target.read_text() == "#!/bin/sh\necho someone else's\n"
    target.unlink()
    target.symlink_to(hook.install(str(tmp_path / "real"), socket_path="/a", spool="/b"))
    with pytest.raises(hook.HookInstallError):   # a symlink, even to our hook, is not our file
        hook.uninstall(str(tmp_path))
    assert target.is_symlink()
    target.unlink()
    os.mkfifo(target)                             # nor a FIFO (reading it would block)
    with pytest.raises(hook.HookInstallError):
        hook.install(str(tmp_path), socket_path="/a", spool="/b")
    assert stat.S_ISFIFO(os.lstat(target).st_mode)


def test_uninstall(tmp_path: Path) -> None:
    assert hook.uninstall(str(tmp_path)) is False
    hook.install(str(tmp_path), socket_path="/a", spool="/b")
    assert hook.uninstall(str(tmp_path)) is True
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("interpreter, match", [
    ("python3", "absolute"), ("/opt/my python/bin/python", "whitespace"), ("/" + "p" * 300, "too long")])
def test_install_refuses_an_unusable_interpreter(tmp_path: Path, interpreter: str, match: str) -> None:
    with pytest.raises(hook.HookInstallError, match=match):
        hook.install(str(tmp_path), socket_path="/a", spool="/b", interpreter=interpreter)
    assert os.listdir(tmp_path) == []


def test_render_refuses_a_broken_template() -> None:
    good = TEMPLATE.read_text()
    for broken in (good.replace("# virtsync-hook:", "# other:"), good.replace("SPOOL = ", "XSPOOL = "),
                   good + '\nSOCKET = "/again"\n'):
        with pytest.raises(hook.HookInstallError):
            hook.render(broken, interpreter="/usr/bin/python3", socket_path="/a", spool="/b")
    with pytest.raises(hook.HookInstallError, match="unix socket"):
        hook.render(good, interpreter="/usr/bin/python3", socket_path="/" + "s" * 107, spool="/b")


# ----------------------------------------------------------------------------- CLI

def test_cli_install_uses_the_config_and_uninstalls(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIRTSYNC_SOCKET", raising=False)
    monkeypatch.delenv("VIRTSYNC_CONFIG", raising=False)
    config = tmp_path / "virtsync.toml"
    config.write_text('[agent]\nname = "pri"\nlisten = "10.0.0.1:8441"\n'
                      'socket = "/run/vs-test/agent.sock"\nstate_dir = "/var/lib/vs-test"\n')
    directory = tmp_path / "qemu.d"
    assert cli.main(["--config", str(config), "--json", "hook", "install", "--dir", str(directory)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"action": "install", "path": str(directory / "virtsync"), "socket": "/run/vs-test/agent.sock",
                      "spool": "/var/lib/vs-test/hook-spool.jsonl", "interpreter": sys.executable}
    text = (directory / "virtsync").read_text()
    assert "SOCKET = '/run/vs-test/agent.sock'" in text and "SPOOL = '/var/lib/vs-test/hook-spool.jsonl'" in text

    # --socket wins over the config, as for every command.
    assert cli.main(["hook", "install", "--config", str(config), "--socket", "/run/other.sock",
                     "--dir", str(directory)]) == 0
    assert f"installed {directory / 'virtsync'}" in capsys.readouterr().out
    assert "SOCKET = '/run/other.sock'" in (directory / "virtsync").read_text()

    assert cli.main(["hook", "uninstall", "--dir", str(directory)]) == 0
    assert capsys.readouterr().out == f"removed {directory / 'virtsync'}\n"
    assert cli.main(["hook", "uninstall", "--dir", str(directory)]) == 0
    assert capsys.readouterr().out == f"no hook at {directory / 'virtsync'}\n"


def test_cli_install_refuses_a_broken_config_where_status_ignores_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """One loader, two tolerances: the socket lookup falls back to the default, the hook
    install refuses rather than bake a default spool path the daemon does not use."""
    monkeypatch.delenv("VIRTSYNC_SOCKET", raising=False)
    config = tmp_path / "virtsync.toml"
    config.write_text('[agent\nstate_dir = "/var/lib/vs-test"\n')
    monkeypatch.setenv("VIRTSYNC_CONFIG", str(config))
    directory = tmp_path / "qemu.d"
    assert cli.main(["hook", "install", "--dir", str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ConfigError: {config}: not valid TOML") and err.count("\n") == 1
    assert not directory.exists()
    args = cli.build_parser().parse_args(["status"])
    assert cli.resolve_socket(args) == cli.DEFAULT_SOCKET


def test_cli_refuses_a_foreign_hook(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "virtsync").write_text("#!/bin/sh\n")
    code = cli.main(["--config", "/nonexistent/virtsync.toml", "--socket", "/a", "hook", "install",
                     "--dir", str(tmp_path)])
    assert code == 2 and "config file /nonexistent/virtsync.toml not found" in capsys.readouterr().err
    code = cli.main(["--socket", "/a", "hook", "uninstall", "--dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("HookInstallError: ") and "not written by virtsync" in err
    assert cli.main(["hook", "reinstall"]) == 2


# ----------------------------------------------------------------------------- spool replay

def write_spool(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def test_read_spool_of_nothing(tmp_path: Path) -> None:
    assert hook.read_spool(str(tmp_path / "missing.jsonl")) == []
    hook.clear_spool(str(tmp_path / "missing.jsonl"))
    assert hook.read_spool(write_spool(tmp_path / "empty.jsonl", b"")) == []


def test_read_spool_skips_malformed_lines_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = [{"domain": "a", "op": "start", "sub_op": "begin", "extra": "-", "time": 1.5, "host_pid": 7},
            {"domain": "b", "op": "stopped", "sub_op": "end", "extra": "-", "time": 2.5, "host_pid": 7}]
    data = (json.dumps(good[0]).encode() + b"\n" + b"not json\n" + b"[1, 2]\n" + b'{"domain": 3, "op": "x"}\n'
            + b"\xff\xfe\n" + b"\n" + json.dumps(good[1]).encode() + b"\n" + b'{"domain":"c","op":"sta')
    path = write_spool(tmp_path / "s.jsonl", data)
    with caplog.at_level(logging.WARNING, logger="virtsync.hook"):
        assert hook.read_spool(path) == good
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 5
    assert "torn last line 8" in warnings[-1]
    assert all("malformed line" in w for w in warnings[:4])


def test_a_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    path = write_spool(tmp_path / "s.jsonl", b'{"domain":"a","op":"start"}')
    assert hook.read_spool(path) == [{"domain": "a", "op": "start"}]


def test_clear_keeps_what_was_spooled_after_the_read(tmp_path: Path) -> None:
    path = write_spool(tmp_path / "s.jsonl", b'{"domain":"a","op":"start"}\n')
    assert [e["domain"] for e in hook.read_spool(path)] == ["a"]
    with open(path, "ab") as f:       # a hook spooling while the daemon replays
        f.write(b'{"domain":"b","op":"start"}\n')
    hook.clear_spool(path)
    assert [e["domain"] for e in hook.read_spool(path)] == ["b"]
    hook.clear_spool(path)
    assert hook.read_spool(path) == []
    assert os.path.getsize(path) == 0 and not os.path.exists(path + ".replay")


def test_a_replay_cut_short_is_read_again(tmp_path: Path) -> None:
    path = write_spool(tmp_path / "s.jsonl", b'{"domain":"a","op":"start"}\n')
    hook.read_spool(path)             # the daemon dies before clear_spool
    with open(path, "ab") as f:
        f.write(b'{"domain":"b","op":"start"}\n')
    assert [e["domain"] for e in hook.read_spool(path)] == ["a", "b"]
    hook.clear_spool(path)
    assert hook.read_spool(path) == []


def test_read_spool_waits_for_a_hook_holding_the_lock(tmp_path: Path) -> None:
    import fcntl

    path = write_spool(tmp_path / "s.jsonl", b'{"domain":"a","op":"start"}\n')
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    fcntl.flock(fd, fcntl.LOCK_EX)
    result: list[list[dict[str, Any]]] = []
    reader = threading.Thread(target=lambda: result.append(hook.read_spool(path)))
    reader.start()
    time.sleep(0.1)
    os.write(fd, b'{"domain":"b","op":"start"}\n')   # the hook's append, under its lock
    os.close(fd)
    reader.join(5)
    assert [e["domain"] for e in result[0]] == ["a", "b"]
