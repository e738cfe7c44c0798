"""``virtsync`` in-process against a real socket and a canned handler: argument checks,
the requests sent, tables, --json, progress, and the error/exit-code contract."""

from __future__ import annotations

import ast
import io
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin import cli, ipc
from plugin.cli import base as cli_base
from plugin.errors import ConfigError, DomainNotFoundError
from tests.unit.test_ipc import ServerThread

ROOT = Path(__file__).resolve().parents[2]

PAIRS = {"pairs": [
    {"domain": "web1", "target": "vda", "peer": "dr1", "state": "active", "reason": "", "lag_seconds": 3.4,
     "bytes_behind": 1258291, "last_marker": 17, "throughput_bps": 52428800.0, "bytes_done": 0, "bytes_total": 0},
    {"domain": "web1", "target": "vdb", "peer": "dr1", "state": "error", "reason": "NBD connection refused",
     "lag_seconds": None, "bytes_behind": 0, "last_marker": 0, "throughput_bps": None,
     "bytes_done": 0, "bytes_total": 0},
    {"domain": "db1", "target": "sda", "peer": "dr1", "state": "initial-copy", "reason": "", "lag_seconds": 754.0,
     "bytes_behind": 3 << 30, "last_marker": 0, "throughput_bps": 1.0e8, "bytes_done": 1 << 30,
     "bytes_total": 4 << 30},
]}
STATUS = {"host": "node1",
          "peers": [{"name": "dr1", "address": "10.0.0.2:8443", "reachable": True,
                     "nbd_server": "10.0.0.1:10809"},
                    {"name": "dr2", "address": "10.0.0.3:8443", "reachable": False}],
          "domains": [{"domain": "web1", "peer": "dr1", "state": "active", "lag_seconds": 12.5, "rpo": 300,
                       "last_marker": 17},
                      {"domain": "db1", "peer": "dr1", "state": "active", "lag_seconds": 400.0, "rpo": 300,
                       "last_marker": 3}]}
MARKERS = {"markers": [
    {"seq": 16, "label": "", "cut_time": 1714564800.0, "bytes": 1048576, "applied": True, "apply": True},
    {"seq": 17, "label": "before upgrade", "cut_time": 1714565100.5, "bytes": {"vda": 512, "vdb": 1024},
     "applied": False, "apply": False},
]}


class Daemon:
    """Records requests and answers with canned results."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.results: dict[str, object] = {"status": STATUS, "pairs": PAIRS, "markers": MARKERS}
        self.failure: Exception | None = None

    async def handle(self, op: str, args: dict[str, Any]) -> object:
        self.requests.append((op, args))
        if self.failure is not None:
            raise self.failure
        if op == "protect" and args.get("wait"):
            return self.protect_progress()
        return self.results.get(op)

    async def protect_progress(self) -> AsyncIterator[object]:
        total = 1000
        for done in range(0, total + 1, 50):
            yield {"target": "vda", "bytes_done": done, "bytes_total": total, "rate_bps": 2048.0}
        yield {"domain": "web1", "pairs": PAIRS["pairs"][:1]}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VIRTSYNC_SOCKET", raising=False)
    monkeypatch.setenv("VIRTSYNC_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setattr(cli_base, "DEFAULT_CONFIG", str(tmp_path / "absent-default.toml"))


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    d = Daemon()
    with ServerThread(tmp_path / "s.sock", d.handle) as server:
        monkeypatch.setenv("VIRTSYNC_SOCKET", server.path)
        yield d


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- bad usage

HUGE = "x" * 1_000_000

BAD_USAGE = [
    [],
    ["bogus"],
    ["status", "extra"],
    ["protect"],
    ["protect", "web1"],
    ["protect", "--to", "dr1"],
    ["protect", "web1", "--to", ""],
    ["protect", "web1", "--to", "d/r"],
    ["protect", "", "--to", "dr1"],
    ["protect", "a/b", "--to", "dr1"],
    ["protect", "web\n1", "--to", "dr1"],
    ["protect", "web\x1b[2J", "--to", "dr1"],
    ["protect", "web\udcff", "--to", "dr1"],
    ["protect", "w" * 256, "--to", "dr1"],
    ["protect", HUGE, "--to", "dr1"],
    ["protect", "web1", "--to", "dr1", "--rpo", "0"],
    ["protect", "web1", "--to", "dr1", "--rpo", "-5"],
    ["protect", "web1", "--to", "dr1", "--rpo", "604801"],
    ["protect", "web1", "--to", "dr1", "--rpo", "abc"],
    ["protect", "web1", "--to", "dr1", "--rpo", "1e3"],
    ["protect", "web1", "--to", "dr1", "--rpo", "3.5"],
    ["protect", "web1", "--to", "dr1", "--rpo", " 60"],
    ["protect", "web1", "--to", "dr1", "--rpo", "\u0663"],
    ["protect", "web1", "--to", "dr1", "--rpo", "9" * 5000],
    ["protect", "web1", "--to", "dr1", "--rpo"],
    ["protect", "web1", "--to", "dr1", "--mode", "fast"],
    ["protect", "web1", "--to", "dr1", "--mode", HUGE],
    ["protect", "web1", "--to", "dr1", "--segment", ""],
    ["unprotect"],
    ["unprotect", "web1", "extra"],
    ["unprotect", "web1", "--keep-replica=yes"],
    ["pairs", "a", "b"],
    ["pairs", "x" * 10_000],
    ["suspend"],
    ["suspend", ""],
    ["resume"],
    ["resume", "a/b"],
    ["mark"],
    ["mark", "web1", "--label", "x" * 129],
    ["mark", "web1", "--label", "a\tb"],
    ["mark", "web1", "--label", "line\nbreak"],
    ["mark", "web1", "--bogus"],
    ["mark", "web1", HUGE],
    ["markers"],
    ["markers", "web1", "web2"],
    ["--socket", "", "status"],
    ["--config", "", "status"],
    ["status", "--socket"],
    ["--no-such-option", "status"],
    [HUGE],
]


@pytest.mark.parametrize("argv", BAD_USAGE, ids=lambda a: repr(a)[:60])
def test_bad_usage_exits_2_with_one_line_and_sends_nothing(daemon: Daemon, capsys: pytest.CaptureFixture[str],
                                                           argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("virtsync: error: ")
    assert "Traceback" not in err
    assert len(err) <= cli.MAX_ERROR_LINE + 100
    assert err.isascii() or err[:-1].isprintable()
    assert daemon.requests == []


def test_bad_usage_names_the_problem(capsys: pytest.CaptureFixture[str]) -> None:
    _, _, err = run(capsys, "protect", "web1", "--to", "dr1", "--rpo", "0")
    assert "--rpo" in err and "604800" in err and "'0'" in err
    _, _, err = run(capsys, "protect", "w" * 300, "--to", "dr1")
    assert "too long (300 characters, at most 255)" in err
    _, _, err = run(capsys, "protect", "web\udcff\n", "--to", "dr1")
    assert "domain name 'web\\udcff\\n' contains control or undecodable characters" in err
    _, _, err = run(capsys, "mark", "web1", "--label", "x" * 129)
    assert "at most 128" in err
    _, _, err = run(capsys, "protect", "web1", "--to", "dr1", "--mode", "fast")
    assert "invalid choice: 'fast'" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "protect" in out and "markers" in out
    code, out, _ = run(capsys, "protect", "--help")
    assert code == 0 and "--rpo" in out


# ----------------------------------------------------------------------------- requests

@pytest.mark.parametrize(("argv", "expected"), [
    (["status"], ("status", {})),
    (["protect", "web1", "--to", "dr1"],
     ("protect", {"domain": "web1", "to": "dr1", "segment": None, "rpo": None, "mode": None, "wait": False})),
    (["protect", "web1", "--to", "dr1", "--segment", "billing", "--rpo", "604800", "--mode", "sync"],
     ("protect", {"domain": "web1", "to": "dr1", "segment": "billing", "rpo": 604800, "mode": "sync",
                  "wait": False})),
    (["unprotect", "web1"], ("unprotect", {"domain": "web1", "keep_replica": False})),
    (["unprotect", "web1", "--keep-replica"], ("unprotect", {"domain": "web1", "keep_replica": True})),
    (["pairs"], ("pairs", {"domain": None})),
    (["pairs", "web1"], ("pairs", {"domain": "web1"})),
    (["suspend", "web1"], ("suspend", {"domain": "web1"})),
    (["resume", "web1"], ("resume", {"domain": "web1"})),
    (["mark", "web1"], ("mark", {"domain": "web1", "label": None, "quiesce": False, "no_apply": False,
                                 "wait": False})),
    (["mark", "web1", "--label", "before upgrade ü", "--quiesce", "--no-apply"],
     ("mark", {"domain": "web1", "label": "before upgrade ü", "quiesce": True, "no_apply": True, "wait": True})),
    (["mark", "web1", "--quiesce", "--crash-consistent-ok"],
     ("mark", {"domain": "web1", "label": None, "quiesce": True, "no_apply": False, "wait": True,
               "crash_consistent_ok": True})),
    (["markers", "my vm-ü.1"], ("markers", {"domain": "my vm-ü.1"})),
    (["markers", "--", "-odd"], ("markers", {"domain": "-odd"})),
])
def test_each_command_sends_one_request(daemon: Daemon, capsys: pytest.CaptureFixture[str], argv: list[str],
                                        expected: tuple[str, dict[str, Any]]) -> None:
    code, _, err = run(capsys, *argv)
    assert (code, err) == (0, "")
    assert daemon.requests == [expected]


@pytest.mark.parametrize("argv", [["status"], ["protect", "web1", "--to", "dr1"], ["unprotect", "web1"], ["pairs"],
                                  ["suspend", "web1"], ["resume", "web1"], ["mark", "web1"], ["markers", "web1"]])
@pytest.mark.parametrize("where", ["before", "after"])
def test_json_output_is_the_result(daemon: Daemon, capsys: pytest.CaptureFixture[str], argv: list[str],
                                   where: str) -> None:
    daemon.results.update({"protect": {"domain": "web1", "pairs": PAIRS["pairs"][:1]},
                           "mark": {"seq": 18, "label": ""}})
    full = ["--json", *argv] if where == "before" else [*argv, "--json"]
    code, out, _ = run(capsys, *full)
    assert code == 0
    assert json.loads(out) == daemon.results.get(argv[0])
    assert out == json.dumps(daemon.results.get(argv[0]), sort_keys=True, indent=2) + "\n"


# ----------------------------------------------------------------------------- rendering

def test_pairs_table(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "pairs")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["DOMAIN", "TARGET", "PEER", "STATE", "LAG", "BEHIND", "MARKER", "RATE"]
    assert lines[1].split() == ["web1", "vda", "dr1", "active", "3.4", "s", "1.2", "MiB", "17", "50.0", "MiB/s"]
    assert lines[2].split() == ["web1", "vdb", "dr1", "error", "-", "0", "B", "-", "-"]
    assert lines[3].strip() == "reason: NBD connection refused"
    assert lines[4].split() == ["db1", "sda", "dr1", "initial-copy", "25%", "12m34s", "3.0", "GiB", "-",
                                "95.4", "MiB/s"]
    # Columns line up under their headers.
    assert lines[1].index("3.4 s") == lines[0].index("LAG")


def test_empty_and_odd_results_do_not_crash(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.results["pairs"] = {"pairs": []}
    assert run(capsys, "pairs")[1] == "no pairs\n"
    daemon.results["pairs"] = {"pairs": [{"domain": "x\x1b[31m"}, "junk"]}
    code, out, _ = run(capsys, "pairs")
    assert code == 0 and "\x1b" not in out and "x\\x1b[31m" in out
    daemon.results["markers"] = {"markers": None}
    assert run(capsys, "markers", "web1")[1] == "no markers for web1\n"
    daemon.results["status"] = [1, 2]
    assert json.loads(run(capsys, "status")[1]) == [1, 2]


def test_status_text(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "status")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "host: node1"
    assert lines[2].split() == ["NAME", "ADDRESS", "REACHABLE", "NBD", "SERVER"]
    assert lines[3].split() == ["dr1", "10.0.0.2:8443", "yes", "10.0.0.1:10809"]
    assert lines[4].split() == ["dr2", "10.0.0.3:8443", "no", "-"]
    assert lines[5] == "domains:"
    assert lines[6].split() == ["DOMAIN", "PEER", "STATE", "LAG", "RPO", "MARKER"]
    assert "12.5 s" in lines[7] and "5m00s" in lines[7]
    assert "6m40s (over RPO)" in lines[8]


def test_status_shows_each_reason_under_its_domain(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.results["status"] = {**STATUS, "domains": [
        {"domain": "db1", "peer": "dr1", "state": "disconnected", "lag_seconds": 400.0, "rpo": 300,
         "last_marker": 3, "reason": "peer dr1 unreachable since 2026-12-04 12:00:00 UTC"},
        {"domain": "web1", "peer": "dr1", "state": "stopped", "lag_seconds": 4000.0, "rpo": 300,
         "last_marker": 17, "reason": "domain not running (shutdown)"},
        {"domain": "app1", "peer": "dr1", "state": "active", "lag_seconds": 1.0, "rpo": 300,
         "last_marker": 9, "reason": ""}]}
    code, out, _ = run(capsys, "status")
    assert code == 0
    lines = out.splitlines()[7:]
    assert lines[0].split()[:3] == ["db1", "dr1", "disconnected"] and "(over RPO)" in lines[0]
    assert lines[1].strip() == "reason: peer dr1 unreachable since 2026-12-04 12:00:00 UTC"
    assert lines[2].split()[:3] == ["web1", "dr1", "stopped"] and "over RPO" not in lines[2]
    assert lines[3].strip() == "reason: domain not running (shutdown)"
    assert lines[4].split()[:3] == ["app1", "dr1", "active"] and len(lines) == 5


def test_markers_table(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "markers", "web1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["SEQ", "CUT", "TIME", "LABEL", "BYTES", "APPLY", "APPLIED", "INTEGRITY"]
    assert lines[1].split() == ["16", "2024-05-01T12:00:00Z", "-", "1.0", "MiB", "yes", "yes", "ok"]
    assert lines[2].split() == ["17", "2024-05-01T12:05:00Z", "before", "upgrade", "1.5", "KiB", "no", "no", "ok"]


def test_short_confirmations(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "suspend", "web1")[1] == "web1: replication suspended\n"
    assert run(capsys, "resume", "web1")[1] == "web1: replication resumed\n"
    assert run(capsys, "unprotect", "web1", "--keep-replica")[1] == "web1: unprotected (replica kept)\n"
    daemon.results["mark"] = {"seq": 18, "label": "nightly"}
    assert run(capsys, "mark", "web1", "--label", "nightly")[1] == "web1: marker 18 (nightly)\n"
    daemon.results["suspend"] = {"message": "web1: already suspended"}
    assert run(capsys, "suspend", "web1")[1] == "web1: already suspended\n"


def test_protect_wait_shows_progress_per_ten_percent_off_a_tty(daemon: Daemon,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "protect", "web1", "--to", "dr1", "--wait")
    assert code == 0
    assert daemon.requests[0][1]["wait"] is True
    progress = err.splitlines()
    assert len(progress) == 11      # 0 %, 10 %, ... 100 %
    assert progress[0].startswith("vda: [....................]   0.0%")
    assert progress[-1].startswith("vda: [####################] 100.0% 1000 B / 1000 B 2.0 KiB/s")
    assert out.splitlines()[0] == "web1: protected to dr1"
    assert out.splitlines()[1].split()[:3] == ["DOMAIN", "TARGET", "PEER"]


def test_progress_on_a_tty_redraws_one_line() -> None:
    stream = io.StringIO()
    render = cli.ProgressRenderer(stream, tty=True)
    for done in (0, 10, 20, 30):
        render({"target": "vda", "bytes_done": done, "bytes_total": 40, "rate_bps": None})
    render({"domain": "web1", "pairs": []})   # the final result, repeated as progress: ignored
    render("junk")
    render.close()
    text = stream.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert "75.0%" in text


def test_progress_without_a_total() -> None:
    stream = io.StringIO()
    render = cli.ProgressRenderer(stream, tty=False)
    render({"target": "vda", "bytes_done": 5 << 20, "bytes_total": 0, "rate_bps": 1 << 20})
    render({"target": "vda", "bytes_done": 6 << 20, "bytes_total": 0, "rate_bps": 1 << 20})
    assert stream.getvalue() == "vda: 5.0 MiB 1.0 MiB/s\n"


@pytest.mark.parametrize(("value", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                             (1258291, "1.2 MiB"), (None, "-"), (True, "-"), ("x", "-")])
def test_human_bytes(value: object, text: str) -> None:
    assert cli.human_bytes(value) == text


@pytest.mark.parametrize(("value", "text"), [(3.4, "3.4 s"), (754, "12m34s"), (7300, "2h01m"),
                                             (200000, "2d07h"), (None, "-"), (float("nan"), "-")])
def test_human_duration(value: object, text: str) -> None:
    assert cli.human_duration(value) == text


# ----------------------------------------------------------------------------- errors

def test_remote_errors_print_type_and_message(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.failure = DomainNotFoundError("domain 'web9' not found")
    assert run(capsys, "pairs", "web9") == (1, "", "DomainNotFoundError: domain 'web9' not found\n")
    daemon.failure = ConfigError("peer 'dr9' is not in the config")
    assert run(capsys, "protect", "web1", "--to", "dr9") == (2, "", "ConfigError: peer 'dr9' is not in the config\n")
    daemon.failure = RuntimeError("oops")
    assert run(capsys, "status") == (1, "", "InternalError: internal error: RuntimeError('oops')\n")
    daemon.failure = DomainNotFoundError("two\nlines")
    assert run(capsys, "status")[2] == "DomainNotFoundError: two\\nlines\n"


def test_debug_adds_the_traceback(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.failure = DomainNotFoundError("domain 'web9' not found")
    code, _, err = run(capsys, "--debug", "pairs", "web9")
    assert code == 1
    assert "Traceback" in err and err.endswith("DomainNotFoundError: domain 'web9' not found\n")


def test_daemon_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "none.sock"
    code, out, err = run(capsys, "--socket", str(path), "status")
    assert (code, out) == (1, "")
    assert err == f"DaemonUnavailableError: virtsync daemon is not running (no socket at {path})\n"


def test_keyboard_interrupt_is_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*args: object, **kwargs: object) -> object:
        raise KeyboardInterrupt
    monkeypatch.setattr(ipc, "request", interrupted)
    code, _, err = run(capsys, "--socket", "/unused.sock", "status")
    assert code == 130 and "Traceback" not in err


def test_a_bug_is_one_line_without_debug(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise AttributeError("no such thing")
    monkeypatch.setattr(ipc, "request", broken)
    code, _, err = run(capsys, "--socket", "/unused.sock", "status")
    assert code == 1 and err.count("\n") == 1 and err.startswith("AttributeError: no such thing")


# ----------------------------------------------------------------------------- socket resolution

def resolve(*argv: str) -> str:
    args = cli.build_parser().parse_args([*argv, "status"])
    return cli.resolve_socket(args)


def test_socket_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "virtsync.toml"
    config.write_text('[agent]\nsocket = "/from/config.sock"\n')
    monkeypatch.delenv("VIRTSYNC_CONFIG")
    assert resolve() == cli.DEFAULT_SOCKET                     # default config absent: fine
    assert resolve("--config", str(config)) == "/from/config.sock"
    monkeypatch.setenv("VIRTSYNC_CONFIG", str(config))
    assert resolve() == "/from/config.sock"
    monkeypatch.setenv("VIRTSYNC_SOCKET", "/from/env.sock")
    assert resolve() == "/from/env.sock"
    assert resolve("--socket", "/from/option.sock") == "/from/option.sock"


def test_unreadable_or_broken_config_falls_back_to_the_default(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "virtsync.toml"
    config.write_text("[agent\nsocket = ")
    assert resolve("--config", str(config)) == cli.DEFAULT_SOCKET
    config.write_text("[agent]\nport = 1\n")
    assert resolve("--config", str(config)) == cli.DEFAULT_SOCKET


def test_an_explicit_missing_config_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--config", str(tmp_path / "nope.toml"), "status")
    assert code == 2 and err == f"ConfigError: config file {tmp_path / 'nope.toml'} not found\n"


def test_a_bad_socket_in_the_config_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "virtsync.toml"
    config.write_text("[agent]\nsocket = 5\n")
    code, _, err = run(capsys, "--config", str(config), "status")
    assert code == 2 and err.startswith("ConfigError: [agent] socket")


# ----------------------------------------------------------------------------- layering

def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


CLI_FILES = sorted(str(p.relative_to(ROOT / "plugin")) for p in (ROOT / "plugin" / "cli").glob("*.py"))


@pytest.mark.parametrize("name", [*CLI_FILES, "ipc.py"])
def test_cli_and_ipc_import_only_the_stdlib_ipc_errors_and_domain(name: str) -> None:
    assert len(CLI_FILES) > 5, "the CLI package was not found"
    for module in imports_of(ROOT / "plugin" / name):
        top = module.split(".")[0]
        assert top in sys.stdlib_module_names or module in {"plugin", "plugin.ipc", "plugin.errors",
                                                           "plugin.errcodec", "plugin.domain", "plugin.ops"} \
            or module.startswith("plugin.cli"), module


VERIFIED_CLEAN = {"domain": "web1", "checked_at": 1714564800.0, "seconds": 1.5, "bytes": 1 << 30,
                  "findings": [], "markers": {}}
VERIFIED_DAMAGED = {"domain": "web1", "checked_at": 1714564800.0, "seconds": 0.2, "bytes": 16 << 20,
                    "findings": ["vda.base.qcow2 chunk 3 (guest bytes 3145728..4194304): content does not match "
                                 "its recorded hash"],
                    "markers": {"17": "marker 17: vda.base.qcow2 chunk 3 (guest bytes 3145728..4194304): content "
                                      "does not match its recorded hash"}}


def test_verify_clean_exits_0(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.results["verify"] = VERIFIED_CLEAN
    code, out, _ = run(capsys, "verify", "web1")
    assert code == 0
    assert out == "web1: verified 1.0 GiB in 1.5 s: no damage found\n"
    assert daemon.requests[-1] == ("verify", {"domain": "web1"})


def test_verify_names_damage_and_exits_1(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.results["verify"] = VERIFIED_DAMAGED
    code, out, _ = run(capsys, "verify", "web1")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("web1: verified 16.0 MiB in ") and lines[0].endswith(": 1 finding(s)")
    assert lines[1] == "  damaged: vda.base.qcow2 chunk 3 (guest bytes 3145728..4194304): content does not match " \
                       "its recorded hash"
    assert lines[2].startswith("  marker 17 will not restore: marker 17: vda.base.qcow2 chunk 3")
    code, out, _ = run(capsys, "verify", "web1", "--json")
    assert code == 1 and json.loads(out)["findings"] == VERIFIED_DAMAGED["findings"]


def test_markers_show_damage(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    markers = json.loads(json.dumps(MARKERS))
    markers["markers"][1]["damage"] = VERIFIED_DAMAGED["markers"]["17"]
    markers["integrity"] = VERIFIED_DAMAGED
    daemon.results["markers"] = markers
    code, out, _ = run(capsys, "markers", "web1")
    lines = out.splitlines()
    assert lines[1].split()[-1] == "ok" and lines[2].split()[-1] == "DAMAGED"
    assert lines[3].startswith("last verified: 2024-05-01T12:00:00Z, 1 finding(s)")
    assert lines[4].startswith("  damaged: vda.base.qcow2 chunk 3")
    assert lines[5].startswith("  marker 17 will not restore: ")


def test_status_shows_damaged_replicas(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    status = dict(STATUS, replicas=[{"domain": "db2", "peer": "pri", "applied": 5, "last_marker": 6,
                                     "journal_damage": None, "checked_at": None,
                                     "findings": VERIFIED_DAMAGED["findings"], "damaged_markers": [5]}])
    daemon.results["status"] = status
    code, out, _ = run(capsys, "status")
    lines = out.splitlines()
    at = lines.index("replicas:")
    assert lines[at + 1].split() == ["DOMAIN", "PEER", "APPLIED", "NEWEST", "VERIFIED", "INTEGRITY"]
    assert lines[at + 2].split() == ["db2", "pri", "5", "6", "never", "DAMAGED"]
    assert lines[at + 3] == "  db2: damaged: " + VERIFIED_DAMAGED["findings"][0]
