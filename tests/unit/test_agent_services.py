"""The agent's composition: one table of IPC operations, filled by the services."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from plugin import ipc, ops
from plugin.config import Config
from plugin.daemon import Agent

# The operations the agent answered before it was split into services: the same after.
OPERATIONS = {"status", "protect", "unprotect", "pairs", "suspend", "resume", "mark", "markers", "apply", "hold",
              "release", "restore", "tracker", "hook", "verify"}


def agent(tmp_path: Path) -> Agent:
    return Agent(Config(name="pri", listen_host="127.0.0.1", listen_port=8441, state_dir=str(tmp_path / "state")))


def test_every_operation_is_registered_once_by_its_service(tmp_path: Path) -> None:
    a = agent(tmp_path)
    assert set(a.router.names()) == OPERATIONS == ops.ALL   # the CLI's table (plugin/ops.py) and the router's
    owners = {name: type(service).__name__ for service in (a.protection, a.journal, a.tracking, a.status)
              for name in service.operations()}
    assert owners["mark"] == "ProtectionService" and owners["apply"] == "Journal"
    assert owners["hook"] == "Tracking" and owners["status"] == "Status"


def test_an_unknown_operation_is_refused_by_the_router(tmp_path: Path) -> None:
    with pytest.raises(ipc.UnknownOperationError, match="unknown operation 'nope'"):
        asyncio.run(agent(tmp_path).handle("nope", {}))


def test_an_operation_registered_twice_is_a_wiring_error() -> None:
    async def op(args: dict[str, object]) -> None:
        return None

    router = ipc.Router()
    router.register({"status": op})
    with pytest.raises(ValueError, match="'status' registered twice"):
        router.register({"status": op})
