"""The group inbox: every request for one protected group runs in order, one at a time,
by the group's own task (docs/DESIGN.md, "The group inbox").

The supervisor, the tracker loop and the IPC operations are the agent's own; only the
replicator's cycle (QEMU and the peer) and the tracker's look at the disks (libvirt)
are replaced by recorders, so the order in which the group's task runs them shows.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from plugin.agent.group import Protected
from plugin.config import Config
from plugin.daemon import Agent
from plugin.domain import PairState, Protection
from plugin.state import Store

UUID = "00000000-0000-0000-0000-0000000000a1"
NAME = "vsg"


class HeldCycles:
    """A replicator whose cycles wait until the test lets them finish."""

    def __init__(self, order: list[str]) -> None:
        self.order = order
        self.last = SimpleNamespace(cut_time=None, rate=None)
        self.in_flight: object | None = None
        self.progress: dict[str, tuple[int, int]] = {}
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.seq = 0

    async def cycle(self, *, label: str, apply: bool, before_cut: Any, after_cut: Any) -> Any:
        self.seq += 1
        seq = self.seq
        self.in_flight = seq
        self.order.append(f"cycle {seq} {label}".rstrip())
        self.started.set()
        await self.release.wait()
        self.order.append(f"cycle {seq} done")
        self.in_flight = None
        return SimpleNamespace(seq=seq, cut_time=time.time(), bytes=0, kind="incremental")


async def until(condition: Any) -> None:
    async with asyncio.timeout(30):
        while not condition():
            await asyncio.sleep(0.01)


def make_agent(tmp_path: Path) -> Agent:
    cfg = Config(name="pri", listen_host="127.0.0.1", listen_port=8441, state_dir=str(tmp_path / "state"))
    agent = Agent(cfg)
    store = Store(str(tmp_path / "state.db"))
    store.add_protection(UUID, "primary", NAME, Protection(peer="dr1", rpo=300))
    store.upsert_pair(UUID, "primary", NAME, "vda", "dr1", 1 << 20, PairState.ACTIVE)
    agent.store = store
    return agent


@pytest.mark.parametrize("first", ["mark", "hook"])
def test_requests_for_a_group_never_run_beside_its_cycle_and_keep_their_order(tmp_path: Path, first: str) -> None:
    agent = make_agent(tmp_path)
    order: list[str] = []
    rep = HeldCycles(order)

    async def look(uuid: str, reason: str) -> list[dict[str, Any]]:
        assert rep.in_flight is None, "the tracker looked at the disks during a cycle"
        order.append(f"track ({reason})")
        return []

    agent.tracking.track = look  # type: ignore[method-assign]

    async def main() -> None:
        p = Protected(UUID, NAME, rep, None)  # type: ignore[arg-type]
        p.attached = p.running = True
        agent.protected[UUID] = p
        p.task = asyncio.create_task(agent.supervision._supervisor(p))
        agent.tracking.start()
        try:
            await rep.started.wait()           # the scheduled cycle runs, and is held
            mark: asyncio.Task[Any] | None = None
            for what in (first, "hook" if first == "mark" else "mark"):
                if what == "mark":
                    mark = asyncio.create_task(agent.handle("mark", {"domain": NAME, "label": "m1"}))
                    await until(lambda: p.marks)
                else:
                    await agent.handle("hook", {"domain": NAME, "op": "started", "sub_op": "begin"})
                    await until(lambda: p.inbox.pending("track"))
            assert mark is not None
            # Both wait in the inbox while the cycle runs: neither the mark's answer nor the look.
            assert order == ["cycle 1"] and not mark.done()
            rep.release.set()
            result = await mark
            await until(lambda: any(o.startswith("track") for o in order))
            assert result["seq"] == 2 and result["label"] == "m1"
            track = "track (hook started begin)"
            if first == "mark":
                assert order == ["cycle 1", "cycle 1 done", "cycle 2 m1", "cycle 2 done", track]
            else:
                assert order == ["cycle 1", "cycle 1 done", track, "cycle 2 m1", "cycle 2 done"]
        finally:
            await agent.tracking.stop()
            p.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await p.task

    asyncio.run(main())


def test_a_group_that_is_no_longer_protected_answers_what_waits(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    rep = HeldCycles([])

    async def main() -> None:
        p = Protected(UUID, NAME, rep, None)  # type: ignore[arg-type]
        p.attached = p.running = True
        agent.protected[UUID] = p
        p.task = asyncio.create_task(agent.supervision._supervisor(p))
        await rep.started.wait()
        mark = asyncio.create_task(agent.handle("mark", {"domain": NAME, "label": "late"}))
        await until(lambda: p.marks)
        agent.parts.db().remove_protection(UUID, "primary")
        rep.release.set()
        with pytest.raises(Exception, match="no longer protected"):
            await mark
        await p.task   # the group's task ends: nothing is left to supervise

    asyncio.run(main())
