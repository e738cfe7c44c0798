"""LibvirtQmpTransport without a daemon: the wire JSON, reply parsing, errors, events.

``libvirt_qemu`` is monkeypatched, so these tests need neither root nor libvirtd.
The e2e tier (tests/e2e/test_lab_host.py) proves the same against real QEMU.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from plugin.virt.qmp_bridge import LibvirtQmpTransport
from qemu_blockdev.errors import QmpCommandError, TransportError


class FakeDomain:
    """Just enough of virDomain: the bridge only passes it to libvirt_qemu."""

    def connect(self) -> object:
        return FAKE_CONN


FAKE_CONN = object()


class Monitor:
    """Scripted replies for ``qemuMonitorCommand``; records what was sent."""

    def __init__(self, *replies: str | BaseException) -> None:
        self.replies = list(replies)
        self.sent: list[dict[str, Any]] = []

    def __call__(self, domain: object, cmd: str, flags: int) -> str:
        assert isinstance(domain, FakeDomain) and flags == 0
        self.sent.append(json.loads(cmd))
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply


def run_with(monkeypatch: pytest.MonkeyPatch, monitor: Monitor, coro: Callable[[LibvirtQmpTransport], Any]) -> Any:
    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", monitor)
    return asyncio.run(coro(LibvirtQmpTransport(FakeDomain())))


def test_execute_sends_qmp_and_returns_the_return_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monitor = Monitor('{"return": [{"device": "drive-virtio-disk0"}], "id": "libvirt-9"}', '{"return": {}}')

    async def scenario(qmp: LibvirtQmpTransport) -> tuple[Any, Any]:
        return (await qmp.execute("query-block"),
                await qmp.execute("block-dirty-bitmap-add", {"node": "libvirt-1-format", "name": "vs-a"}))

    assert run_with(monkeypatch, monitor, scenario) == ([{"device": "drive-virtio-disk0"}], {})
    assert monitor.sent == [
        {"execute": "query-block"},
        {"execute": "block-dirty-bitmap-add", "arguments": {"node": "libvirt-1-format", "name": "vs-a"}},
    ]


def test_qmp_error_reply_raises_qmp_command_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # libvirt hands back QEMU's error reply as a successful call (virsh exits 0).
    monitor = Monitor('{"id": "libvirt-12", "error": {"class": "CommandNotFound", '
                      '"desc": "The command nope has not been found"}}')
    with pytest.raises(QmpCommandError) as err:
        run_with(monkeypatch, monitor, lambda qmp: qmp.execute("nope"))
    assert (err.value.command, err.value.error_class) == ("nope", "CommandNotFound")
    assert err.value.desc == "The command nope has not been found"


@pytest.mark.parametrize("raw", ["not json", '{"id": "libvirt-3"}', "[1, 2]"])
def test_malformed_reply_raises_transport_error(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    with pytest.raises(TransportError):
        run_with(monkeypatch, Monitor(raw), lambda qmp: qmp.execute("query-status"))


def test_libvirt_error_becomes_chained_transport_error(monkeypatch: pytest.MonkeyPatch) -> None:
    libvirt.virResetLastError()  # libvirtError() takes the thread's last error over its argument
    cause = libvirt.libvirtError("Requested operation is not valid: domain is not running")
    with pytest.raises(TransportError) as err:
        run_with(monkeypatch, Monitor(cause), lambda qmp: qmp.execute("query-status"))
    assert err.value.__cause__ is cause
    assert "domain is not running" in str(err.value)


def test_events_reach_listeners_from_libvirt_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The callback may run on a libvirt thread: delivery goes through the loop."""
    registered: dict[str, Any] = {}

    def register(conn: object, dom: object, event: str | None, cb: Callable[..., None],
                 opaque: object, flags: int) -> int:
        registered.update(conn=conn, event=event, cb=cb)
        return 7

    deregistered: list[int] = []
    monkeypatch.setattr(libvirt_qemu, "qemuMonitorEventRegister", register)
    monkeypatch.setattr(libvirt_qemu, "qemuMonitorEventDeregister", lambda conn, cid: deregistered.append(cid))

    async def scenario() -> None:
        qmp = LibvirtQmpTransport(FakeDomain())
        async with qmp:
            assert registered["conn"] is FAKE_CONN and registered["event"] is None  # all events
            with qmp.listen({"JOB_STATUS_CHANGE"}, lambda e: e.data.get("id") == "vs-job") as events:
                fire = registered["cb"]
                thread = threading.Thread(target=lambda: [
                    fire(FAKE_CONN, None, "STOP", 1, 0, None, None),
                    fire(FAKE_CONN, None, "JOB_STATUS_CHANGE", 1, 0, '{"id": "other", "status": "created"}', None),
                    fire(FAKE_CONN, None, "JOB_STATUS_CHANGE", 1700000000, 250000,
                         '{"id": "vs-job", "status": "running"}', None),
                ])
                thread.start()
                async with asyncio.timeout(5):
                    event = await events.get()
                thread.join()
                assert event.name == "JOB_STATUS_CHANGE"
                assert event.data == {"id": "vs-job", "status": "running"}
                assert event.timestamp == pytest.approx(1700000000.25)
            with qmp.listen() as open_listener:
                await qmp.close()
                with pytest.raises(TransportError):
                    await open_listener.get()
        assert deregistered == [7]
        with pytest.raises(TransportError):
            await qmp.execute("query-status")

    asyncio.run(scenario())
