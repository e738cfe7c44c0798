"""plugin.config: every refusal is one ConfigError line that names the file and the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plugin import config
from plugin.config import Config
from plugin.domain import PeerSpec
from plugin.errors import ConfigError

FILE = "/etc/virtsync/test.toml"

GOOD = """\
[agent]
name = "pri"
listen = "10.250.0.1:8441"
socket = "/run/virtsync/agent.sock"
state_dir = "/var/lib/virtsync"
libvirt_uri = "qemu:///system"

[replication]
address = "10.250.0.1"
port = 10809
storage = "/srv/replicas"
cycle_timeout = 120
stall_after = 2.5
min_cycle_interval = 0.5
tls_priority = "NORMAL:-CIPHER-ALL:+AES-256-GCM"

[peers.dr1]
address = "10.250.0.2:8441"

[peers.dr-2]
address = "[fd00::2]:9000"
"""


def minimal(agent: str = "", replication: str = "", rest: str = "") -> str:
    return f'[agent]\nname = "pri"\nlisten = "10.250.0.1:8441"\n{agent}\n[replication]\n{replication}\n{rest}'


def refused(text: str) -> str:
    """The message of the ConfigError that ``text`` gives; it must be one line naming the file."""
    with pytest.raises(ConfigError) as info:
        config.parse(text, FILE)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, repr(message)
    assert FILE in message, message
    assert len(message) < 400, message
    assert info.value.exit_code == 2
    return message


# -- what a good file gives ----------------------------------------------------

def test_full_file_parses_every_key() -> None:
    cfg = config.parse(GOOD, FILE)
    assert cfg == Config(
        name="pri", listen_host="10.250.0.1", listen_port=8441, socket="/run/virtsync/agent.sock",
        state_dir="/var/lib/virtsync", libvirt_uri="qemu:///system", replication_address="10.250.0.1",
        replication_port=10809, storage="/srv/replicas",
        peers={"dr1": PeerSpec("dr1", "10.250.0.2", 8441), "dr-2": PeerSpec("dr-2", "fd00::2", 9000)},
        cycle_timeout=120.0, stall_after=2.5, min_cycle_interval=0.5,
        tls_priority="NORMAL:-CIPHER-ALL:+AES-256-GCM", path=FILE)
    assert isinstance(cfg.cycle_timeout, float)
    assert cfg.db_path == "/var/lib/virtsync/state.db"
    assert cfg.peer("dr1").port == 8441


def test_defaults_follow_the_agent() -> None:
    cfg = config.parse('[agent]\nname = "pri"\nlisten = "10.250.0.1:8441"\nstate_dir = "/srv/vs"\n', FILE)
    assert cfg.replication_address == "10.250.0.1"   # the NBD server binds where the peer API binds
    assert cfg.replication_port == 10809
    assert cfg.storage == "/srv/vs/replicas"
    assert cfg.peers == {}


def test_unknown_peer_names_the_known_ones() -> None:
    cfg = config.parse(GOOD, FILE)
    with pytest.raises(ConfigError, match=r"unknown peer 'nope' \(configured peers: dr-2, dr1\)"):
        cfg.peer("nope")


# -- missing and wrong-typed keys ----------------------------------------------

@pytest.mark.parametrize("text, key", [
    ('[agent]\nlisten = "10.250.0.1:8441"\n', "agent.name"),
    ('[agent]\nname = ""\nlisten = "10.250.0.1:8441"\n', "agent.name"),
    ('[agent]\nname = "pri"\n', "agent.listen"),
    ("", "agent.name"),
    ('[agent]\nname = "pri"\nlisten = "10.250.0.1:8441"\n[peers.dr1]\n', "peers.dr1.address"),
])
def test_missing_keys(text: str, key: str) -> None:
    assert key in refused(text)


@pytest.mark.parametrize("text, key", [
    (minimal(agent="").replace('name = "pri"', "name = 7"), "agent.name"),
    (minimal().replace('listen = "10.250.0.1:8441"', "listen = 8441"), "agent.listen"),
    (minimal(agent="socket = 5"), "agent.socket"),
    (minimal(agent="state_dir = true"), "agent.state_dir"),
    (minimal(agent="libvirt_uri = []"), "agent.libvirt_uri"),
    (minimal(replication="address = 10"), "replication.address"),
    (minimal(replication='port = "10809"'), "replication.port"),
    (minimal(replication="port = true"), "replication.port"),
    (minimal(replication="port = 10809.0"), "replication.port"),
    (minimal(replication="storage = {}"), "replication.storage"),
    (minimal(replication='cycle_timeout = "10m"'), "replication.cycle_timeout"),
    (minimal(replication="stall_after = false"), "replication.stall_after"),
    (minimal(replication="min_cycle_interval = [1]"), "replication.min_cycle_interval"),
    (minimal(rest="[peers.dr1]\naddress = 8441\n"), "peers.dr1.address"),
    ('agent = 5\n', "agent"),
    ('agent = "x"\n', "agent"),
    (minimal() + "peers = 3\n", "peers"),
    (minimal(rest="[peers]\ndr1 = \"10.0.0.2:8441\"\n"), "peers.dr1"),
])
def test_wrong_types(text: str, key: str) -> None:
    assert key in refused(text)


@pytest.mark.parametrize("name", ["pri host", "a/b", "x" * 65, "pri\n", "prï", "-", "_"])
def test_bad_agent_names(name: str) -> None:
    text = minimal().replace('name = "pri"', f"name = {name!r}".replace("'", '"').replace("\n", "\\n"))
    assert "agent.name" in refused(text)


@pytest.mark.parametrize("key, value", [
    ("cycle_timeout", "0"), ("cycle_timeout", "-1"), ("cycle_timeout", "nan"), ("cycle_timeout", "inf"),
    ("stall_after", "0"), ("stall_after", "-0.5"), ("stall_after", "nan"),
    ("min_cycle_interval", "-1"), ("min_cycle_interval", "inf"),
])
def test_durations_must_be_finite_and_positive(key: str, value: str) -> None:
    assert f"replication.{key}" in refused(minimal(replication=f"{key} = {value}"))


@pytest.mark.parametrize("key, value", [
    ("agent", 'socket = ""'), ("agent", 'state_dir = ""'), ("replication", 'storage = ""'),
    ("agent", 'socket = "/run/a\\u0000b"'), ("replication", 'storage = "/srv/\\u0000"'),
])
def test_paths_must_be_usable(key: str, value: str) -> None:
    text = minimal(agent=value) if key == "agent" else minimal(replication=value)
    assert f"{key}.{value.split(' ')[0]}" in refused(text)


# -- addresses and ports ---------------------------------------------------------

@pytest.mark.parametrize("listen", [
    "0.0.0.0:8441", "[::]:8441", ":8441", "*:8441", "[::0]:8441", "[0:0:0:0:0:0:0:0]:8441",
    "[::ffff:0.0.0.0]:8441",
])
def test_wildcard_listen_refused(listen: str) -> None:
    message = refused(minimal().replace("10.250.0.1:8441", listen))
    assert "agent.listen" in message and "wildcard" in message


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "", "*", "::0", "0:0::0"])
def test_wildcard_replication_address_refused(address: str) -> None:
    message = refused(minimal(replication=f'address = "{address}"'))
    assert "replication.address" in message and "wildcard" in message


def test_wildcard_peer_address_refused() -> None:
    message = refused(minimal(rest='[peers.dr1]\naddress = "0.0.0.0:8441"\n'))
    assert "peers.dr1.address" in message and "wildcard" in message


@pytest.mark.parametrize("listen, why", [
    ("10.250.0.1", "missing port"),
    ("10.250.0.1:", "bad port"),
    ("10.250.0.1:0", "out of range"),
    ("10.250.0.1:65536", "out of range"),
    ("10.250.0.1:-1", "bad port"),
    ("10.250.0.1:http", "bad port"),
    ("10.250.0.1:+80", "bad port"),
    ("10.250.0.1: 80", "bad port"),
    ("10.250.0.1:8_441", "bad port"),
    ("10.250.0.1:\u0668\u0660", "bad port"),   # Arabic-Indic digits: int() takes them, a port may not
    ("host.example:8441", "not an IP address"),
    ("10.250.0.300:8441", "not an IP address"),
])
def test_bad_listen(listen: str, why: str) -> None:
    message = refused(minimal().replace("10.250.0.1:8441", listen))
    assert "agent.listen" in message and why in message


@pytest.mark.parametrize("port", ["0", "-5", "65536", "99999999999"])
def test_bad_replication_port(port: str) -> None:
    message = refused(minimal(replication=f"port = {port}"))
    assert "replication.port" in message and "range" in message


def test_localhost_and_ipv6_accepted() -> None:
    cfg = config.parse(minimal(replication='address = "::1"').replace("10.250.0.1:8441", "localhost:8441"), FILE)
    assert (cfg.listen_host, cfg.listen_port, cfg.replication_address) == ("localhost", 8441, "::1")


# -- sections, keys, peers ------------------------------------------------------

def test_unknown_section() -> None:
    message = refused(minimal(rest="[replicaton]\nport = 1\n"))
    assert "unknown section" in message and "replicaton" in message


def test_unknown_section_with_control_characters_stays_one_line() -> None:
    message = refused(minimal(rest='["evil\\nsection"]\nx = 1\n'))
    assert "unknown section" in message


def test_top_level_key_is_an_unknown_section() -> None:
    assert "name" in refused('name = "pri"\n' + minimal())


@pytest.mark.parametrize("section, key", [
    ("agent", "lisen"), ("replication", "stall_afterr"), ("replication", "adress"),
])
def test_unknown_keys(section: str, key: str) -> None:
    text = minimal(agent=f"{key} = 1") if section == "agent" else minimal(replication=f"{key} = 1")
    message = refused(text)
    assert f"{section}.{key}" in message and "unknown key" in message


def test_unknown_peer_key() -> None:
    message = refused(minimal(rest='[peers.dr1]\naddress = "10.0.0.2:8441"\nport = 1\n'))
    assert "peers.dr1.port" in message and "unknown key" in message


def test_peer_with_own_name() -> None:
    assert "peers.pri" in refused(minimal(rest='[peers.pri]\naddress = "10.0.0.2:8441"\n'))


@pytest.mark.parametrize("name", ["dr 1", "a\\nb", "", "x/y"])
def test_bad_peer_names(name: str) -> None:
    message = refused(minimal(rest=f'[peers."{name}"]\naddress = "10.0.0.2:8441"\n'))
    assert "peer" in message


# -- not TOML, not UTF-8, huge, unreadable --------------------------------------

@pytest.mark.parametrize("text", ["[agent\nname = 1", "name = = 2", "\x00\x01", "[agent]\nname = 'a\nb'\n",
                                  "[agent]\n[agent]\n"])
def test_not_toml(text: str) -> None:
    assert "not valid TOML" in refused(text)


def write(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "virtsync.toml"
    path.write_bytes(data)
    return str(path)


def test_load_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.encode())
    assert config.load(path).path == path


def load_refused(path: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert "\n" not in message and path in message, message
    return message


def test_load_non_utf8(tmp_path: Path) -> None:
    assert "not UTF-8" in load_refused(write(tmp_path, GOOD.encode() + b'\n# caf\xe9\n'))


def test_load_binary(tmp_path: Path) -> None:
    message = load_refused(write(tmp_path, os.urandom(4096) + b"\xff\xfe"))
    assert "not UTF-8" in message or "not valid TOML" in message


def test_load_huge_file_refused_not_truncated(tmp_path: Path) -> None:
    # A valid file padded past the limit with comments: reading only a prefix
    # would silently accept a file whose tail was never checked.
    data = GOOD.encode() + b"# padding padding padding\n" * (1 << 16)
    assert len(data) > 1 << 20
    assert "too large" in load_refused(write(tmp_path, data))


def test_load_huge_file_cut_inside_a_character(tmp_path: Path) -> None:
    # The limit falls inside a multi-byte character: still "too large", not "not UTF-8".
    data = GOOD.encode() + "# é\n".encode() * (1 << 19)
    assert "too large" in load_refused(write(tmp_path, data))


def test_load_missing_file(tmp_path: Path) -> None:
    message = load_refused(str(tmp_path / "nope.toml"))
    assert "cannot read" in message and "No such file" in message


def test_load_directory(tmp_path: Path) -> None:
    assert "cannot read" in load_refused(str(tmp_path))


def test_load_empty_file(tmp_path: Path) -> None:
    assert "agent.name" in load_refused(write(tmp_path, b""))


def test_load_names_the_file_in_parse_errors(tmp_path: Path) -> None:
    path = write(tmp_path, minimal(replication="port = 0").encode())
    assert "replication.port" in load_refused(path)


def test_tls_priority_auto_default_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    base = '[agent]\nname = "pri"\nlisten = "10.0.0.1:8441"\n[replication]\n'
    monkeypatch.setattr(config, "cpu_has_aes", lambda: True)
    assert config.parse(base).tls_priority == config.AES_PRIORITY
    monkeypatch.setattr(config, "cpu_has_aes", lambda: False)
    assert config.parse(base).tls_priority is None
    assert config.parse(base + 'tls_priority = "default"').tls_priority is None
    assert config.parse(base + 'tls_priority = "NORMAL:-VERS-TLS1.2"').tls_priority == "NORMAL:-VERS-TLS1.2"
    with pytest.raises(ConfigError, match="not a sound GnuTLS priority"):
        config.parse(base + 'tls_priority = "NORMAL:+NULL"')


def test_scrub_interval() -> None:
    assert config.parse(minimal(), FILE).scrub_interval == 7 * 24 * 3600   # weekly by default
    assert config.parse(minimal(rest="[journal]\nscrub_interval = 0"), FILE).scrub_interval == 0   # off
    assert config.parse(minimal(rest="[journal]\nscrub_interval = 3600"), FILE).scrub_interval == 3600.0


@pytest.mark.parametrize("value", ["-1", "nan", "inf", '"weekly"', "true"])
def test_bad_scrub_interval(value: str) -> None:
    assert "journal.scrub_interval" in refused(minimal(rest=f"[journal]\nscrub_interval = {value}"))


# ----------------------------------------------------------------------------- agent_path: the CLI's and hook's loader

def test_agent_path_reads_one_agent_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    # The other keys are the daemon's business: a config load() refuses still gives its socket.
    cfg.write_text('[agent]\nsocket = "/run/x.sock"\nport = 1\n')
    for tolerant in (True, False):
        assert config.agent_path(str(cfg), "socket", explicit=True, tolerant=tolerant) == "/run/x.sock"
        assert config.agent_path(str(cfg), "state_dir", explicit=True, tolerant=tolerant) is None


@pytest.mark.parametrize("tolerant", [True, False])
def test_agent_path_missing_file(tmp_path: Path, tolerant: bool) -> None:
    absent = str(tmp_path / "none.toml")
    assert config.agent_path(absent, "state_dir", explicit=False, tolerant=tolerant) is None
    with pytest.raises(ConfigError, match=f"^config file {absent} not found$"):
        config.agent_path(absent, "state_dir", explicit=True, tolerant=tolerant)


@pytest.mark.parametrize("content", [b"not toml [", b"[agent\nsocket = ", b"\xff\xfe", b"x" * (config.MAX_SIZE + 2)])
def test_agent_path_broken_file_ignored_only_when_tolerant(tmp_path: Path, content: bytes) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(content)
    for explicit in (True, False):
        assert config.agent_path(str(cfg), "socket", explicit=explicit, tolerant=True) is None   # the CLI
        with pytest.raises(ConfigError, match=str(cfg)) as info:                                # the hook install
            config.agent_path(str(cfg), "state_dir", explicit=explicit, tolerant=False)
        assert "\n" not in str(info.value)


def test_agent_path_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root reads a 0000 file: a directory is unreadable as a config for everyone.
        cfg = tmp_path / "dir.toml"
        cfg.mkdir()
    else:
        cfg = tmp_path / "c.toml"
        cfg.write_text('[agent]\nsocket = "/run/x.sock"\n')
        cfg.chmod(0)
    assert config.agent_path(str(cfg), "socket", explicit=True, tolerant=True) is None
    with pytest.raises(ConfigError, match="cannot read config"):
        config.agent_path(str(cfg), "state_dir", explicit=True, tolerant=False)


@pytest.mark.parametrize("value", ["5", '""', '"a\\u0000b"', "[1]"])
def test_agent_path_bad_value_is_refused_either_way(tmp_path: Path, value: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[agent]\nstate_dir = {value}\n")
    for tolerant in (True, False):
        with pytest.raises(ConfigError, match=f"^\\[agent\\] state_dir in {cfg} must be a non-empty path$"):
            config.agent_path(str(cfg), "state_dir", explicit=False, tolerant=tolerant)


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIRTSYNC_CONFIG", raising=False)
    assert config.config_path(None) == (config.DEFAULT_PATH, False)
    monkeypatch.setenv("VIRTSYNC_CONFIG", "/from/env.toml")
    assert config.config_path(None) == ("/from/env.toml", True)
    assert config.config_path("/given.toml") == ("/given.toml", True)


def test_defaults_in_one_place() -> None:
    cfg = config.parse('[agent]\nname = "a"\nlisten = "127.0.0.1:8441"\n')
    assert (cfg.socket, cfg.state_dir, cfg.keys_dir) == (config.DEFAULT_SOCKET, config.DEFAULT_STATE_DIR,
                                                         config.DEFAULT_KEYS_DIR)
