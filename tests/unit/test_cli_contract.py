"""The CLI's contract as a golden file (``pytest --regenerate`` rewrites): every command,
its options and the IPC operation it sends. Moving the CLI's code must not change it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from plugin import cli, ipc

GOLDEN = Path(__file__).parent.parent / "data" / "cli" / "contract.json"

#: One valid command line per command: run with ipc.request recorded, it shows the op sent.
SAMPLES: dict[str, list[str]] = {
    "status": ["status"],
    "protect": ["protect", "web1", "--to", "dr1"],
    "unprotect": ["unprotect", "web1"],
    "pairs": ["pairs"],
    "suspend": ["suspend", "web1"],
    "resume": ["resume", "web1"],
    "mark": ["mark", "web1"],
    "markers": ["markers", "web1"],
    "apply": ["apply", "web1"],
    "hold": ["hold", "web1"],
    "release": ["release", "web1"],
    "restore": ["restore", "web1", "--marker", "3", "--to", "/nonexistent/restore"],
    "verify": ["verify", "web1"],
    "tracker": ["tracker"],
    "hook": ["hook", "uninstall", "--dir", "{tmp}"],
    "keys": ["keys", "show"],
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _describe(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The arguments of one (sub)parser: what a user may type, not how it is printed."""
    arguments = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        arguments.append({
            "flags": list(action.option_strings), "dest": action.dest, "required": action.required,
            "nargs": action.nargs, "choices": sorted(action.choices) if action.choices else None,
            "metavar": action.metavar, "takes_value": action.nargs != 0,
            "default": action.default if isinstance(action.default, (str, int, float, bool, type(None)))
            else repr(action.default),
        })
    out: dict[str, Any] = {"arguments": arguments}
    subs = _subparsers(parser)
    if subs:
        out["actions"] = {name: _describe(sub) for name, sub in sorted(subs.items())}
    return out


def _op_sent(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The IPC operation ``virtsync ARGV`` sends (None: it runs locally)."""
    sent: list[str] = []

    class SentError(Exception):
        pass

    def request(path: str, op: str, args: dict[str, Any], **_: Any) -> object:
        sent.append(op)
        raise SentError

    with monkeypatch.context() as m:
        m.setattr(ipc, "request", request)
        try:
            cli.main(["--socket", "/nonexistent/agent.sock", *argv])
        except SentError:
            pass
    assert len(sent) <= 1, f"{argv} sent {sent}"
    return sent[0] if sent else None


def contract(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> dict[str, Any]:
    parser = cli.build_parser()
    commands = _subparsers(parser)
    assert sorted(commands) == sorted(SAMPLES), "every command needs a sample command line here"
    monkeypatch.setenv("VIRTSYNC_CONFIG", str(tmp / "absent.toml"))
    return {
        "global": _describe(parser)["arguments"],
        "commands": {name: {**_describe(sub),
                            "op": _op_sent([a.replace("{tmp}", str(tmp)) for a in SAMPLES[name]], monkeypatch)}
                     for name, sub in sorted(commands.items())},
    }


def test_cli_contract_matches_golden(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, regenerate: bool,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    got = json.loads(json.dumps(contract(monkeypatch, tmp_path)))
    capsys.readouterr()
    if regenerate or not GOLDEN.exists():
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
        if not regenerate:
            pytest.fail(f"golden file {GOLDEN} was missing and has been written; review and commit it")
    assert got == json.loads(GOLDEN.read_text())


def test_every_daemon_command_sends_one_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The probe can tell: a daemon command sends exactly its op, a local one none."""
    got = contract(monkeypatch, tmp_path)["commands"]
    assert got["pairs"]["op"] == "pairs"
    assert got["hook"]["op"] is None and got["keys"]["op"] is None
