"""pytest fixtures of the e2e tier: lab hosts, each with its own libvirtd.

Import into a conftest with ``from tests.lab.fixtures import *``.

libvirt takes one event-loop implementation per process, for good, and
:func:`plugin.virt.connection.open_connection` binds it to the running loop
(libvirtaio). So every test that talks to libvirt runs its coroutines on the
one session loop of :func:`lab_runner` (``lab_runner.run(coro)``), never on a
fresh ``asyncio.run`` loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import libvirt
import pytest

from plugin.virt.connection import open_connection
from tests.lab.host import LabHost, lab_prerequisites, reap_stale, running_hosts

__all__ = [
    "LabPair", "lab_connect", "lab_factory", "lab_host", "lab_pair", "lab_runner", "module_lab_pair", "require_lab",
]

_reaped = False


class LabPair(NamedTuple):
    """Two linked lab hosts: the primary and the secondary site."""

    pri: LabHost
    sec: LabHost


def require_lab() -> None:
    """Skip unless lab hosts can run here; clean up after a killed earlier run once."""
    global _reaped
    reason = lab_prerequisites()
    if reason:
        pytest.skip(reason)
    if not _reaped:
        reap_stale()
        _reaped = True


@pytest.fixture(scope="session")
def lab_runner() -> Iterator[asyncio.Runner]:
    """The session's one asyncio loop, on which libvirt events are delivered."""
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest) -> Callable[..., list[LabHost]]:
    """``make(*names, listen_tcp=False)``: started hosts, linked pairwise (full mesh)."""
    require_lab()

    def make(*names: str, listen_tcp: bool = False) -> list[LabHost]:
        stack = contextlib.ExitStack()
        request.addfinalizer(stack.close)
        return stack.enter_context(running_hosts(*names, listen_tcp=listen_tcp))

    return make


@pytest.fixture
def lab_host(lab_factory: Callable[..., list[LabHost]]) -> LabHost:
    """One started lab host, unlinked (its address is its netns' 127.0.0.1)."""
    return lab_factory("host")[0]


@pytest.fixture
def lab_pair(lab_factory: Callable[..., list[LabHost]]) -> LabPair:
    """Two started lab hosts, "pri" and "sec", joined by a veth pair."""
    pri, sec = lab_factory("pri", "sec")
    return LabPair(pri, sec)


@pytest.fixture(scope="module")
def module_lab_pair() -> Iterator[LabPair]:
    """As ``lab_pair``, shared by the tests of a module (a scenario run in steps)."""
    require_lab()
    with running_hosts("pri", "sec") as (pri, sec):
        yield LabPair(pri, sec)


@pytest.fixture
def lab_connect(
    lab_runner: asyncio.Runner, lab_factory: Callable[..., list[LabHost]]
) -> Iterator[Callable[[LabHost], libvirt.virConnect]]:
    """``connect(host)``: a libvirt connection on the session loop.

    Depends on ``lab_factory`` so that its connections close before the hosts stop.
    """
    conns: list[libvirt.virConnect] = []

    def connect(host: LabHost) -> libvirt.virConnect:
        conn = lab_runner.run(open_connection(host.uri))
        conns.append(conn)
        return conn

    yield connect

    async def close_all() -> None:
        for conn in reversed(conns):
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        await asyncio.sleep(0)  # let libvirtaio run the free callbacks of removed handles

    lab_runner.run(close_all())
