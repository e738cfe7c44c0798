"""The secondary's per-peer NBD servers on real qemu-storage-daemons (loopback).

Each peer's server takes that peer's key only; an export added to one server is not
on the other; a port already taken ends the start in one line naming the peer and
the port, with no daemon left running.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
from pathlib import Path

import pytest

from plugin.replication.nbd_servers import PeerServers
from plugin.replication.storage_daemon import StorageDaemonError
from qemu_blockdev import commands, nodes
from tests.integration.conftest import NEEDS_QEMU, make_image

pytestmark = [pytest.mark.qemu, NEEDS_QEMU]


def free_ports(n: int) -> int:
    """A base port with ``n`` consecutive free ports after it (loopback is shared)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            holds = []
            for port in range(base, base + n):
                s = socket.socket()
                holds.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in holds:
                s.close()
    raise RuntimeError("no free ports")


def client_dir(tmp_path: Path, user: str, key: str) -> str:
    d = tmp_path / f"client-{user}"
    d.mkdir(mode=0o700)
    (d / "keys.psk").write_text(f"{user}:{key}\n")
    return str(d)


def nbd_list(port: int, psk_dir: str, user: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-nbd", "-L", "-b", "127.0.0.1", "-p", str(port), "--object",
                           f"tls-creds-psk,id=t0,endpoint=client,dir={psk_dir},username={user}", "--tls-creds", "t0"],
                          capture_output=True, text=True, timeout=30, check=False)


def test_each_server_takes_its_peers_key_only(tmp_path: Path) -> None:
    base = free_ports(2)
    keys = {"pri": secrets.token_hex(32), "evil": secrets.token_hex(32)}
    servers = PeerServers(str(tmp_path / "nbd"), "127.0.0.1", base, ["pri", "evil"])
    assert servers.ports == {"evil": base, "pri": base + 1}
    image = make_image(str(tmp_path / "r.qcow2"), "16M")
    clients = {user: client_dir(tmp_path, user, key) for user, key in keys.items()}

    async def scenario() -> dict[tuple[str, str], subprocess.CompletedProcess[str]]:
        servers.configure(keys)
        await servers.start()
        try:
            qmp, port = servers.server("pri")
            await nodes.blockdev_add(qmp, commands.file_node("vs-p1-f", image))
            await nodes.blockdev_add(qmp, commands.qcow2_node("vs-p1", "vs-p1-f"))
            await nodes.export_add(qmp, "vs-e1", "vs-p1", name="pri-export", writable=True)
            return {(server, user): await asyncio.to_thread(nbd_list, servers.ports[server], clients[user], user)
                    for server in keys for user in keys}
        finally:
            await servers.stop()

    results = asyncio.run(scenario())
    assert results["pri", "pri"].returncode == 0 and "export: 'pri-export'" in results["pri", "pri"].stdout
    assert results["evil", "evil"].returncode == 0 and "exports available: 0" in results["evil", "evil"].stdout
    for server, user in (("pri", "evil"), ("evil", "pri")):
        res = results[server, user]
        assert res.returncode != 0 and "TLS handshake failed" in res.stderr, res
        assert "pri-export" not in res.stdout + res.stderr


def test_a_taken_port_fails_the_start_in_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    base = free_ports(2)
    servers = PeerServers(str(tmp_path / "nbd"), "127.0.0.1", base, ["a", "b"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        servers.configure({"a": "ab" * 32, "b": "cd" * 32})
        daemons = list(servers.daemons.values())
        with pytest.raises(StorageDaemonError, match=f"NBD server of peer b on 127.0.0.1:{base + 1} could not start"
                           ) as info:
            asyncio.run(servers.start())
    assert "\n" not in str(info.value)
    assert servers.daemons == {}
    assert all(d._proc is not None and d._proc.returncode is not None for d in daemons)


def test_ports_run_out_with_a_clear_line(tmp_path: Path) -> None:
    servers = PeerServers(str(tmp_path / "nbd"), "127.0.0.1", 65535, ["a", "b"])
    with pytest.raises(StorageDaemonError, match=r"no NBD port for peers b \(65536\)"):
        servers.configure({"a": "ab" * 32, "b": "cd" * 32})
