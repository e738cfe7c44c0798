"""``virtsync --help`` and the agent's IPC router cannot disagree: the CLI's command table
sends only operations named in :mod:`plugin.ops`, and the agent answers every one of them."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from plugin import ipc, ops
from plugin.cli import COMMANDS, build_parser
from plugin.config import Config

ROOT = Path(__file__).resolve().parents[2]


def cli_ops() -> dict[str, str]:
    return {c.name: c.op for c in COMMANDS if c.op is not None}


def test_the_command_table_is_the_parser() -> None:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command_name"]
    assert list(sub.choices or ()) == [c.name for c in COMMANDS]


def test_every_op_the_cli_sends_is_a_named_op_and_every_op_is_sent_by_someone() -> None:
    sent = cli_ops()
    assert set(sent.values()) <= ops.ALL, set(sent.values()) - ops.ALL
    assert set(sent.values()) | ops.FROM_HOOK == ops.ALL, "an op nobody sends"
    assert len(set(sent.values())) == len(sent), "two commands send one op"
    local = {c.name for c in COMMANDS if c.op is None}
    assert local == {"hook", "keys"}, "only hook and keys run without the daemon"


def test_the_libvirt_hook_sends_the_hook_op() -> None:
    """hooks/qemu imports nothing of ours, so it spells the op: it must be ops.HOOK."""
    sent = re.findall(rb'"op":"([a-z_-]+)"', (ROOT / "plugin" / "hooks" / "qemu").read_bytes())
    assert sent == [ops.HOOK.encode()]


def agent_dispatch(tmp_path: Path) -> Callable[[str, dict[str, Any]], Awaitable[Any]]:
    """The agent's IPC entry point, as the IPC server calls it (plugin/daemon.py)."""
    from plugin.daemon import Agent
    agent = Agent(Config(name="pri", listen_host="127.0.0.1", listen_port=8441, state_dir=str(tmp_path / "state"),
                         keys_dir=str(tmp_path / "keys"), peers={}))
    return agent.handle


async def answers(dispatch: Callable[[str, dict[str, Any]], Awaitable[Any]], op: str) -> bool:
    """Whether the router knows ``op``: any outcome but UnknownOperationError counts (the
    handlers run on an agent that was never started, with no arguments, so most refuse)."""
    try:
        result = dispatch(op, {})
        if hasattr(result, "__anext__"):
            await asyncio.wait_for(result.__anext__(), 5)
        else:
            await asyncio.wait_for(result, 5)
    except ipc.UnknownOperationError:
        return False
    except Exception:
        return True
    return True


@pytest.mark.parametrize("op", sorted(ops.ALL))
def test_the_agent_answers_every_named_op(op: str, tmp_path: Path) -> None:
    assert asyncio.run(answers(agent_dispatch(tmp_path), op)), f"the agent's router does not know {op!r}"


def test_the_probe_tells_an_unknown_op(tmp_path: Path) -> None:
    assert not asyncio.run(answers(agent_dispatch(tmp_path), "no-such-op"))


@pytest.mark.parametrize("path", sorted((ROOT / "plugin" / "cli").glob("*.py")), ids=lambda p: p.name)
def test_no_cli_module_is_over_400_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 400, f"{path.name}: split it by command group"
