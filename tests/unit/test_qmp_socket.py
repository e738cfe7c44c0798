"""QmpSocketTransport.connect while the monitor's socket appears (issue 12's start-up noise):
the attempts that are retried log nothing; only a connection that finally fails is logged."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from qemu_blockdev.errors import TransportError
from qemu_blockdev.qmp_socket import QmpSocketTransport

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}}


async def _monitor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Just enough of a QMP monitor: the greeting, then ``{"return": {}}`` to every command
    (qemu.qmp sends JSON without newlines, as QEMU's streaming parser allows)."""
    writer.write(json.dumps(GREETING).encode() + b"\n")
    await writer.drain()
    buf, decoder = "", json.JSONDecoder()
    while data := await reader.read(4096):
        buf += data.decode()
        while buf.strip():
            try:
                request, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            reply = {"return": {}, **({"id": request["id"]} if "id" in request else {})}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    writer.close()


def failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "Failed to establish connection" in r.getMessage()]


def test_a_socket_that_appears_late_logs_no_failure(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "qmp.sock")

    async def main() -> None:
        async def late_server() -> asyncio.AbstractServer:
            await asyncio.sleep(0.3)   # several attempts fail first (FileNotFoundError)
            return await asyncio.start_unix_server(_monitor, path)

        server_task = asyncio.create_task(late_server())
        qmp = QmpSocketTransport(path, name="vs-test")
        await qmp.connect(timeout=10)
        assert await qmp.execute("query-status") == {}
        await qmp.close()
        server = await server_task
        server.close()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert not failures(caplog)


def test_a_connection_that_finally_fails_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "never.sock")

    async def main() -> None:
        with pytest.raises(TransportError, match="cannot connect to QMP at .*never.sock"):
            await QmpSocketTransport(path, name="vs-test").connect(timeout=0.3)

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert [r.levelname for r in failures(caplog)] == ["ERROR"]
