"""plugin.keys and ``virtsync keys``: files, modes, groups, imports, and no secret ever shown."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from plugin import cli, keys
from plugin.keys import KeyFileError, KeysDir

pytestmark = pytest.mark.skipif(not keys.shutil.which("openssl"), reason="needs the openssl CLI")


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def write_config(tmp_path: Path, name: str, peers: dict[str, str], **agent: str) -> Path:
    lines = ["[agent]", f'name = "{name}"', 'listen = "127.0.0.1:8441"',
             f'keys_dir = "{tmp_path / name / "keys"}"', f'state_dir = "{tmp_path / name / "state"}"',
             *(f'{k} = "{v}"' for k, v in agent.items())]
    for peer, address in peers.items():
        lines += [f"[peers.{peer}]", f'address = "{address}:8441"']
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def virtsync(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def psk_of(path: Path) -> str:
    return path.read_text().strip().rpartition(":")[2]


# -- files and modes ----------------------------------------------------------------------

@pytest.mark.parametrize("gid", [False, "own"], ids=["no-qemu-group", "qemu-group"])
def test_init_creates_private_files(tmp_path: Path, gid: Any) -> None:
    group = os.getgid() if gid == "own" else None
    kd = KeysDir(str(tmp_path / "etc" / "keys"), "pri", gid=group if group is not None else False)
    assert kd.ensure_identity() is True
    assert kd.ensure_psk("dr1") is True
    root = tmp_path / "etc" / "keys"
    assert mode(tmp_path / "etc") == 0o755          # a parent QEMU must pass through
    assert mode(root / "agent.key") == 0o600        # the agent's own private key: never group-readable
    assert mode(root / "agent.crt") == 0o644        # public
    if group is None:
        assert mode(root) == 0o700 and mode(root / "dr1") == 0o700
        assert mode(root / "dr1" / "keys.psk") == 0o600
    else:
        assert mode(root) == 0o750 and mode(root / "dr1") == 0o750
        assert mode(root / "dr1" / "keys.psk") == 0o640
        assert os.stat(root / "dr1" / "keys.psk").st_gid == group
        assert os.stat(root / "dr1").st_gid == group
    user, key = keys.read_psk(str(root / "dr1" / "keys.psk"))
    assert user == "pri" and len(key) == 64          # QEMU's format: "<this host>:<hex>"
    assert sorted(os.listdir(root)) == ["agent.crt", "agent.key", "dr1"]  # no temporary files left


def test_init_is_idempotent_and_renew_replaces(tmp_path: Path) -> None:
    kd = KeysDir(str(tmp_path / "k"), "pri", gid=False)
    kd.ensure_identity()
    kd.ensure_psk("dr1")
    fp, psk = kd.fingerprint(), kd.peer_psk("dr1")
    assert kd.ensure_identity() is False and kd.ensure_psk("dr1") is False
    assert (kd.fingerprint(), kd.peer_psk("dr1")) == (fp, psk)
    assert kd.ensure_identity(renew=True) is True
    assert kd.fingerprint() != fp and kd.peer_psk("dr1") == psk


def test_existing_dirs_are_tightened(tmp_path: Path) -> None:
    root = tmp_path / "k"
    root.mkdir(mode=0o777)
    os.chmod(root, 0o777)
    KeysDir(str(root), "pri", gid=False).ensure_psk("dr1")
    assert mode(root) == 0o700


def test_certificate_is_ec_self_signed_and_not_a_ca(tmp_path: Path) -> None:
    kd = KeysDir(str(tmp_path / "k"), "pri", gid=False)
    kd.ensure_identity()
    text = subprocess.run(["openssl", "x509", "-in", kd.cert_path, "-noout", "-text"], capture_output=True,
                          text=True, check=True).stdout
    assert "CN = pri" in text and "CA:FALSE" in text and "prime256v1" in text


def test_too_open_files_are_refused(tmp_path: Path) -> None:
    kd = KeysDir(str(tmp_path / "k"), "pri", gid=False)
    kd.ensure_identity()
    kd.ensure_psk("dr1")
    os.chmod(kd.key_path, 0o640)
    with pytest.raises(KeyFileError, match="too open"):
        kd.check_identity()
    os.chmod(kd.key_path, 0o600)
    os.chmod(kd.psk_path("dr1"), 0o644)
    with pytest.raises(KeyFileError, match="too open") as info:
        kd.peer_psk("dr1")
    assert psk_of(Path(kd.psk_path("dr1"))) not in str(info.value)


def test_missing_material_says_what_to_run(tmp_path: Path) -> None:
    kd = KeysDir(str(tmp_path / "k"), "pri", gid=False)
    with pytest.raises(KeyFileError, match="virtsync keys init"):
        kd.check_identity()
    kd.ensure_identity()
    with pytest.raises(KeyFileError, match="keys import dr1 --cert"):
        kd.peer("dr1")


def test_openssl_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys.shutil, "which", lambda name: None)
    with pytest.raises(KeyFileError, match="openssl not found"):
        KeysDir(str(tmp_path / "k"), "pri", gid=False).ensure_identity()


def test_no_secret_on_the_openssl_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """openssl makes the private key itself into a 0700 dir under umask 077; argv holds paths only."""
    seen: list[dict[str, Any]] = []
    real = subprocess.run

    def spy(argv: list[str], **kw: Any) -> Any:
        seen.append({"argv": argv, "umask": kw.get("umask")})
        return real(argv, **kw)

    monkeypatch.setattr(keys.subprocess, "run", spy)
    kd = KeysDir(str(tmp_path / "k"), "pri", gid=False)
    kd.ensure_identity()
    key_text = Path(kd.key_path).read_text()
    assert seen and all(s["umask"] == 0o077 for s in seen)
    assert not any(part in key_text for s in seen for part in s["argv"] if len(part) > 20)


def test_own_name_is_not_a_peer(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="own name"):
        KeysDir(str(tmp_path / "k"), "pri", gid=False).ensure_psk("pri")
    for bad in ("../x", "", "a/b", "."):
        with pytest.raises(KeyFileError):
            KeysDir(str(tmp_path / "k"), "pri", gid=False).peer_dir(bad)


def test_server_psk_file(tmp_path: Path) -> None:
    d = keys.write_server_psk(str(tmp_path / "run" / "nbd-psk"), {"sec": "ab" * 32, "dr1": "cd" * 32})
    assert mode(d) == 0o700 and mode(Path(d) / "keys.psk") == 0o600
    assert (Path(d) / "keys.psk").read_text() == f"dr1:{'cd' * 32}\nsec:{'ab' * 32}\n"


# -- imports --------------------------------------------------------------------------------

def test_import_psk_takes_the_key_under_this_hosts_name(tmp_path: Path) -> None:
    pri = KeysDir(str(tmp_path / "pri"), "pri", gid=False)
    pri.ensure_psk("sec")
    sec = KeysDir(str(tmp_path / "sec"), "sec", gid=False)
    assert sec.import_psk("pri", pri.psk_path("sec")) is True
    assert keys.read_psk(sec.psk_path("pri")) == ("sec", pri.peer_psk("sec"))
    assert sec.import_psk("pri", pri.psk_path("sec")) is False
    bare = tmp_path / "bare"
    bare.write_text("AB" * 20 + "\n")
    assert sec.import_psk("pri", str(bare)) is True and sec.peer_psk("pri") == "ab" * 20


@pytest.mark.parametrize("content", ["", "pri:\n", "pri:zz" + "0" * 40, "pri:abc", "pri:" + "ab" * 4,
                                     "pri:" + "ab" * 20 + "\nsec:" + "ab" * 20, "../x:" + "ab" * 20,
                                     "\xff\xfe", "x" * 70000], ids=repr)
def test_import_psk_refuses_malformed(tmp_path: Path, content: str) -> None:
    src = tmp_path / "src"
    src.write_bytes(content.encode("utf-8", "surrogateescape") if content != "\xff\xfe" else b"\xff\xfe")
    sec = KeysDir(str(tmp_path / "sec"), "sec", gid=False)
    with pytest.raises(KeyFileError) as info:
        sec.import_psk("pri", str(src))
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
    assert not os.path.exists(sec.psk_path("pri"))


def test_import_cert_pins_and_refuses_others(tmp_path: Path) -> None:
    pri = KeysDir(str(tmp_path / "pri"), "pri", gid=False)
    sec = KeysDir(str(tmp_path / "sec"), "sec", gid=False)
    pri.ensure_identity()
    sec.ensure_identity()
    fp, changed = sec.import_cert("pri", pri.cert_path)
    assert changed and fp == pri.fingerprint()
    assert mode(sec.peer_cert_path("pri")) == 0o644
    assert sec.import_cert("pri", pri.cert_path) == (fp, False)
    with pytest.raises(KeyFileError, match="own certificate"):
        sec.import_cert("pri", sec.cert_path)
    with pytest.raises(KeyFileError, match="no private key|exactly one"):
        sec.import_cert("pri", sec.key_path)
    garbage = tmp_path / "g.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    with pytest.raises(KeyFileError, match="not a usable certificate"):
        sec.import_cert("pri", str(garbage))
    with pytest.raises(KeyFileError, match="cannot read"):
        sec.import_cert("pri", str(tmp_path / "missing.pem"))


# -- the CLI --------------------------------------------------------------------------------

def test_cli_pair_setup_never_prints_a_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The documented admin flow, both hosts, with --json and without: no key in any output."""
    pri_cfg = write_config(tmp_path, "pri", {"sec": "127.0.0.2"})
    sec_cfg = write_config(tmp_path, "sec", {"pri": "127.0.0.1"})
    outputs = []
    code, out, err = virtsync(capsys, "keys", "init", "sec", "--config", str(pri_cfg))
    assert code == 0, err
    outputs.append(out + err)
    psk_path = tmp_path / "pri" / "keys" / "sec" / "keys.psk"
    assert f"{psk_path}" in out and "not shown" in out and "virtsync keys import pri" in out
    code, out, err = virtsync(capsys, "keys", "import", "pri", "--cert", str(tmp_path / "pri" / "keys" / "agent.crt"),
                              "--psk", str(psk_path), "--config", str(sec_cfg))
    assert code == 0, err
    outputs.append(out + err)
    code, out, err = virtsync(capsys, "keys", "import", "sec", "--cert", str(tmp_path / "sec" / "keys" / "agent.crt"),
                              "--config", str(pri_cfg), "--json")
    assert code == 0, err
    outputs.append(out + err)
    result = json.loads(out)
    assert result["peer_fingerprint"].startswith("SHA256:")
    for cfg in (pri_cfg, sec_cfg):
        for extra in ((), ("--json",)):
            code, out, err = virtsync(capsys, "keys", "show", "--config", str(cfg), *extra)
            assert code == 0, err
            outputs.append(out + err)
    shown = json.loads(outputs[-1])
    assert shown["peers"] == [{"peer": "pri", "configured": True, "insecure_plain": False,
                               "cert_fingerprint": KeysDir(str(tmp_path / "pri" / "keys"), "pri").fingerprint(),
                               "nbd_key": "ok"}]
    secret = psk_of(psk_path)
    assert psk_of(tmp_path / "sec" / "keys" / "pri" / "keys.psk") == secret
    private = (tmp_path / "pri" / "keys" / "agent.key").read_text().splitlines()[1]
    for text in outputs:
        assert secret not in text and secret.upper() not in text and private not in text


@pytest.mark.parametrize("argv, code, message", [
    (["keys"], 2, "required"),
    (["keys", "init"], 2, "PEER"),
    (["keys", "init", "../x"], 2, "peer"),
    (["keys", "init", "pri"], 2, "own name"),
    (["keys", "import", "sec"], 2, "--cert FILE, --psk FILE or both"),
    (["keys", "import", "sec", "--cert", "/nonexistent/c.pem"], 2, "cannot read certificate"),
    (["keys", "frobnicate"], 2, "invalid choice"),
])
def test_cli_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int,
                       message: str) -> None:
    cfg = write_config(tmp_path, "pri", {"sec": "127.0.0.2"})
    got, out, err = virtsync(capsys, *argv, "--config", str(cfg))
    assert got == code
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = virtsync(capsys, "keys", "show", "--config", str(tmp_path / "none.toml"))
    assert code == 2 and err.startswith("ConfigError:") and "none.toml" in err
