"""Every error class has its exit code, documented in docs/DESIGN.md §3 ("Exit codes per
error class"), and ``virtsync`` exits with it, raised locally or sent by the agent."""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import plugin
from plugin import cli, ipc
from plugin.errors import PluginError, StateConflictError, VirtError
from tests.unit.test_ipc import ServerThread

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| `(\w+)` \((\S+)\) \| (\d+|as sent) \| .+ \|$")


def error_classes() -> dict[str, type[PluginError]]:
    """Every PluginError subclass defined in plugin/ (all its modules imported)."""
    for info in pkgutil.walk_packages(plugin.__path__, "plugin."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    found: dict[str, type[PluginError]] = {}
    todo: list[type[PluginError]] = [PluginError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("plugin."):
            assert cls.__name__ not in found, f"two error classes named {cls.__name__}"
            found[cls.__name__] = cls
        todo += cls.__subclasses__()
    return found


def documented() -> dict[str, tuple[str, str]]:
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    section = text.split("### Exit codes per error class", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = ROW.match(line)
        if m:
            assert m[1] not in rows, f"{m[1]} documented twice"
            rows[m[1]] = (m[2], m[3])
    return rows


def instance(cls: type[PluginError]) -> PluginError:
    if issubclass(cls, ipc.RemoteError):
        return cls("SomeNewerError", "boom", 3)
    if issubclass(cls, StateConflictError):
        return cls("boom", state="a", required="b")
    if issubclass(cls, VirtError):
        return cls("boom", 42)
    return cls("boom")


def expected_code(cls: type[PluginError]) -> int:
    return 3 if issubclass(cls, ipc.RemoteError) else cls.exit_code


def test_every_error_class_is_documented_with_its_exit_code() -> None:
    classes, docs = error_classes(), documented()
    assert len(classes) > 20
    assert sorted(docs) == sorted(classes), "the table and the classes differ"
    for name, cls in classes.items():
        module, code = docs[name]
        assert f"plugin.{module}" == cls.__module__, name
        assert code == ("as sent" if issubclass(cls, ipc.RemoteError) else str(cls.exit_code)), name


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VIRTSYNC_SOCKET", raising=False)
    monkeypatch.setenv("VIRTSYNC_CONFIG", str(tmp_path / "absent.toml"))


@pytest.mark.parametrize("name", sorted(error_classes()))
def test_the_cli_exits_with_the_class_code_when_raised_locally(name: str, clean_env: None,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    cls = error_classes()[name]

    def request(*_: Any, **__: Any) -> object:
        raise instance(cls)

    monkeypatch.setattr(ipc, "request", request)
    assert cli.main(["--socket", "/nonexistent.sock", "pairs"]) == expected_code(cls)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(": boom\n"), err


class Failing:
    def __init__(self) -> None:
        self.error: PluginError = PluginError("unset")

    async def handle(self, op: str, args: dict[str, Any]) -> object:
        raise self.error


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None) -> Iterator[Failing]:
    d = Failing()
    with ServerThread(tmp_path / "s.sock", d.handle) as server:
        monkeypatch.setenv("VIRTSYNC_SOCKET", server.path)
        yield d


@pytest.mark.parametrize("name", sorted(error_classes()))
def test_the_cli_exits_with_the_class_code_when_the_agent_raises_it(name: str, agent: Failing,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cls = error_classes()[name]
    agent.error = instance(cls)
    assert cli.main(["pairs"]) == expected_code(cls)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(": boom\n"), err
