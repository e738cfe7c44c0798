"""The agent's security wiring: keys to links, socket group, wildcard refusal."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

import pytest

from plugin import daemon, keys, peer
from plugin.config import Config
from plugin.daemon import Agent
from plugin.domain import PeerSpec
from plugin.keys import KeyFileError, KeysDir
from plugin.replication.storage_daemon import StorageDaemonError

needs_openssl = pytest.mark.skipif(not keys.shutil.which("openssl"), reason="needs the openssl CLI")


def cfg(tmp_path: Path, **kw: object) -> Config:
    peers = kw.pop("peers", {"sec": PeerSpec("sec", "127.0.0.2", 8441), "dr2": PeerSpec("dr2", "127.0.0.3", 8441)})
    return Config(name="pri", listen_host="127.0.0.1", listen_port=8441, state_dir=str(tmp_path / "state"),
                  keys_dir=str(tmp_path / "keys"), peers=peers, **kw)  # type: ignore[arg-type]


def test_virtsyncd_refuses_a_wildcard_listen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for listen in ("0.0.0.0:8441", "[::]:8441", "[::ffff:0.0.0.0]:8441"):
        path = tmp_path / "c.toml"
        path.write_text(f'[agent]\nname = "pri"\nlisten = "{listen}"\n')
        assert daemon.main(["--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ConfigError:") and "wildcard" in err and len(err.splitlines()) == 1


def test_missing_identity_stops_the_agent(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="virtsync keys init"):
        Agent(cfg(tmp_path))._setup_links()


@needs_openssl
def test_links_from_keys(tmp_path: Path, pri_keys: KeysDir) -> None:
    """sec has keys and becomes a TLS client; dr2 has none and is unusable with the reason."""
    kd = pri_keys
    agent = Agent(cfg(tmp_path))
    server_ctx, identify = agent._setup_links()
    assert server_ctx is not None and server_ctx.verify_mode.name == "CERT_REQUIRED"
    assert agent.parts.peers["sec"].ssl_context is not None and agent.parts.peers["sec"].base.startswith("https://")
    assert "no certificate pinned for peer dr2" in agent.parts.peers["dr2"].unusable
    assert agent.parts.link_tls("sec").dir == kd.peer_dir("sec") and agent.parts.link_tls("sec").username == "pri"
    with pytest.raises(KeyFileError, match="dr2"):
        agent.parts.link_tls("dr2")
    # One NBD server per usable peer, knowing that peer's key only; none for dr2, with the reason.
    agent.nbd.configure(agent.parts._server_psks, agent.parts._unserved)
    assert sorted(agent.nbd.daemons) == ["sec"]
    psk_dir = Path(agent.nbd.daemons["sec"].tls_dir or "")
    assert (psk_dir / "keys.psk").read_text() == f"sec:{kd.peer_psk('sec')}\n"
    assert stat.S_IMODE(os.stat(psk_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(psk_dir / "keys.psk").st_mode) == 0o600
    with pytest.raises(StorageDaemonError, match="no NBD server for peer dr2: no certificate pinned"):
        agent.nbd.server("dr2")


def test_plain_only_by_explicit_setting(tmp_path: Path) -> None:
    plain = {"sec": PeerSpec("sec", "127.0.0.2", 8441, insecure_plain=True)}
    agent = Agent(cfg(tmp_path, peers=plain))
    server_ctx, _ = agent._setup_links()
    assert server_ctx is None
    agent.nbd.configure(agent.parts._server_psks, agent.parts._unserved)
    assert [d.tls_dir for d in agent.nbd.daemons.values()] == [None]
    assert agent.parts.peers["sec"].ssl_context is None and agent.parts.peers["sec"].base.startswith("http://")
    assert agent.parts.link_tls("sec") is None


def test_socket_group(tmp_path: Path) -> None:
    assert Agent(cfg(tmp_path, socket_group="kvm"))._socket_group() == "kvm"
    try:
        grp.getgrnam("libvirt")
        expected: str | None = "libvirt"
    except KeyError:
        expected = None
    assert Agent(cfg(tmp_path))._socket_group() == expected


def test_peer_client_brackets_ipv6() -> None:
    assert peer.PeerClient(PeerSpec("x", "fd00::2", 8441), None).base == "http://[fd00::2]:8441/v1"


def test_primary_tls_object_lives_with_the_nbd_nodes(tmp_path: Path) -> None:
    """object-add (after dropping a leftover) before the NBD nodes; object-del after them. No key in QMP."""
    import asyncio

    from plugin.domain import DiskSpec
    from plugin.replication.primary import DomainReplicator
    from plugin.replication.shipper import NbdTls, add_tls_client
    from plugin.state import Store
    from tests.fakes.fake_qmp import FakeQmp

    qmp = FakeQmp()
    qmp.on("object-del", {"error": {"class": "GenericError", "desc": "object 'vs-tls-nbd' not found"}})
    qmp.on("object-del")
    qmp.on("object-add")
    qmp.on("blockdev-del")
    rep = DomainReplicator(store=Store(str(tmp_path / "s.db")), peer=None, qmp=qmp,  # type: ignore[arg-type]
                           uuid="u", domain="d", disks=[DiskSpec("vda", "/x", "qcow2", 1, "n0")],
                           scratch=str(tmp_path), shipper=qmp,
                           cycle_timeout=1, stall_after=1, tls=NbdTls("/etc/virtsync/keys/sec", "pri"))

    async def go() -> None:
        assert await add_tls_client(qmp, rep.tls) == "vs-tls-nbd"
        await rep._remove_nbd_nodes()

    asyncio.run(go())
    assert qmp.sent == [
        ("object-del", {"id": "vs-tls-nbd"}),
        ("object-add", {"qom-type": "tls-creds-psk", "id": "vs-tls-nbd", "endpoint": "client",
                        "dir": "/etc/virtsync/keys/sec", "username": "pri"}),
        ("blockdev-del", {"node-name": "vs-nbd-vda"}),
        ("object-del", {"id": "vs-tls-nbd"}),
    ]


def test_no_server_key_stays_for_a_server_that_does_not_run(tmp_path: Path) -> None:
    from plugin.replication.nbd_servers import PeerServers

    run_dir = tmp_path / "run"
    legacy = run_dir / "nbd-psk"
    legacy.mkdir(parents=True)
    (legacy / "keys.psk").write_text("sec:" + "ab" * 32 + "\n")
    servers = PeerServers(str(run_dir / "nbd"), "127.0.0.1", 10809, ["sec", "dr2", "gone"])
    servers.configure({"sec": "ab" * 32, "dr2": "cd" * 32, "gone": "ef" * 32})
    assert sorted(os.listdir(run_dir / "nbd")) == ["dr2", "gone", "sec"]
    servers = PeerServers(str(run_dir / "nbd"), "127.0.0.1", 10809, ["sec", "dr2"])
    servers.configure({"sec": "ab" * 32}, {"dr2": "no certificate pinned"})
    assert sorted(os.listdir(run_dir / "nbd")) == ["sec"] and not legacy.exists()
    servers.configure(None)   # every peer plain: servers without keys, and no key file left
    assert sorted(servers.daemons) == ["dr2", "sec"] and list((run_dir / "nbd").rglob("*")) == [run_dir / "nbd" / "sec"]
