"""The ship at stop without QEMU: names in the shared storage daemon, and a start
that comes first (the real images and daemons: tests/integration/test_offline_ship.py)."""

from __future__ import annotations

import asyncio
import uuid as uuidlib

from plugin.replication.offline import OfflineShips, Outcome, StopResult, image_node
from plugin.replication.primary import job_name, nbd_node_name
from plugin.replication.shipper import domain_tag

LONGEST_TARGET = "x" * 16  # the longest disk target the peer API accepts
NODE_NAME_MAX = 31          # QEMU refuses longer node names


def test_offline_names_fit_qemu_and_differ_between_domains() -> None:
    tags = [domain_tag(str(uuidlib.uuid4())) for _ in range(2)]
    names = []
    for tag in tags:
        mine = {image_node(tag, LONGEST_TARGET), f"{image_node(tag, LONGEST_TARGET)}-f",
                nbd_node_name(LONGEST_TARGET, tag)}
        assert all(len(n) <= NODE_NAME_MAX for n in mine), mine
        names.append(mine | {job_name(LONGEST_TARGET, 7, tag)})
    assert not names[0] & names[1]
    # Untagged (the guest's own QEMU): the names cycles always used.
    assert (nbd_node_name("vda"), job_name("vda", 7)) == ("vs-nbd-vda", "vs-cyc7-vda")


def test_a_start_cancels_the_ship_and_waits_for_its_cleanup() -> None:
    async def main() -> None:
        ships = OfflineShips()
        closed = asyncio.Event()

        async def ship() -> StopResult:
            try:
                await asyncio.sleep(3600)
            finally:
                await asyncio.sleep(0.05)   # closing the images takes a moment
                closed.set()
            return StopResult(Outcome.SHIPPED)

        running = asyncio.create_task(ships.run("u1", ship()))
        await asyncio.sleep(0.01)
        assert await ships.abort("u1")
        assert closed.is_set(), "abort returns only once the ship has cleaned up"
        assert (await running).outcome is Outcome.ABORTED
        # Until the start is over, no ship begins; other domains are not concerned.
        assert (await ships.run("u1", ship())).outcome is Outcome.BUSY
        assert not await ships.abort("u2")
        ships.starting("u1", False)
        ships.starting("u2", False)

        async def nothing() -> StopResult:
            return StopResult(Outcome.NOTHING)

        assert (await ships.run("u1", nothing())).outcome is Outcome.NOTHING

    asyncio.run(main())


def test_cancelling_the_caller_ends_the_ship() -> None:
    async def main() -> None:
        ships = OfflineShips()
        ended = asyncio.Event()

        async def ship() -> StopResult:
            try:
                await asyncio.sleep(3600)
            finally:
                ended.set()
            return StopResult(Outcome.SHIPPED)

        caller = asyncio.create_task(ships.run("u1", ship()))
        await asyncio.sleep(0.01)
        caller.cancel()   # unprotect, or the agent stops
        await asyncio.gather(caller, return_exceptions=True)
        assert ended.is_set()

    asyncio.run(main())
