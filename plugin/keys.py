"""TLS material of an agent: its identity for the peer API and the NBD keys it shares with peers.

Everything lives in ``[agent] keys_dir`` (default ``/etc/virtsync/keys``)::

    keys_dir/                 0750 root:libvirt-qemu  (0700 where that group does not exist)
      agent.key               0600  this agent's private key (peer API, mutual TLS); never leaves the host
      agent.crt               0644  its self-signed certificate, CN = the agent's name: give it to each peer
      <peer>/                 0750 root:libvirt-qemu  (0700)
        cert.pem              0644  the peer's certificate, pinned: the only certificate accepted as <peer>
        keys.psk              0640 root:libvirt-qemu  (0600)  ``<this host>:<hex key>``, the pair's NBD key

``<peer>/`` is, as it stands, the ``dir`` of the ``tls-creds-psk`` client object the primary adds
to its QEMU: QEMU reads ``keys.psk`` itself (under libvirt it runs as ``libvirt-qemu``, hence the
group), so the key is never on a command line, in QMP or in a log. The peer keeps the same key
under its own name in ``keys_dir/<this host>/keys.psk``. The secondary runs one NBD server
(qemu-storage-daemon) per peer; each reads a file holding that one peer's ``<peer>:<key>`` line,
which the agent writes at start into the daemon's run directory (0700): :func:`write_server_psk`.

Setting up a pair, hosts ``pri`` and ``dr1`` (both agents read their names from the config)::

    pri# virtsync keys init dr1           # pri's identity if missing + a new NBD key for dr1
    pri# scp /etc/virtsync/keys/agent.crt /etc/virtsync/keys/dr1/keys.psk root@dr1:/root/from-pri/
    dr1# virtsync keys import pri --cert /root/from-pri/agent.crt --psk /root/from-pri/keys.psk
    dr1# scp /etc/virtsync/keys/agent.crt root@pri:/root/dr1.crt
    pri# virtsync keys import dr1 --cert /root/dr1.crt
    both# virtsync keys show               # the fingerprints must match across the two hosts
    (restart both agents: they read keys at start)

Secrets are created here (``secrets``) or by ``openssl`` (the private key), written under a
restrictive umask into a temporary file that is renamed into place, and never printed.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import re
import secrets
import shutil
import ssl
import stat
import subprocess
import tempfile
from dataclasses import dataclass

from .config import _valid_name as valid_name
from .errors import ConfigError

__all__ = [
    "CERT_DAYS",
    "KeyFileError",
    "KeysDir",
    "PeerKeys",
    "fingerprint",
    "fingerprint_der",
    "qemu_gid",
    "read_psk",
    "write_server_psk",
]

#: Group of QEMU processes under libvirt on Debian; it must read a primary's ``<peer>/keys.psk``.
QEMU_GROUP = "libvirt-qemu"
IDENTITY_KEY = "agent.key"
IDENTITY_CERT = "agent.crt"
PEER_CERT = "cert.pem"
PSK_FILE = "keys.psk"
PSK_BYTES = 32
#: Pinned certificates still expire (OpenSSL checks the dates): ten years, renewed with ``keys init --renew``.
CERT_DAYS = 3650
MAX_FILE = 64 << 10
_HEX = re.compile(r"[0-9a-f]+")


class KeyFileError(ConfigError):
    """Key material is missing, malformed or too open; the message says which file and what to run."""


def qemu_gid() -> int | None:
    """The ``libvirt-qemu`` group id, or None where that group does not exist."""
    try:
        return grp.getgrnam(QEMU_GROUP).gr_gid
    except KeyError:
        return None


def fingerprint_der(der: bytes) -> str:
    """``SHA256:ab:cd:...`` of a DER certificate, as ``openssl x509 -fingerprint -sha256`` shows it."""
    digest = hashlib.sha256(der).hexdigest()
    return "SHA256:" + ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def fingerprint(pem: str) -> str:
    return fingerprint_der(ssl.PEM_cert_to_DER_cert(pem))


def _read_small(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > MAX_FILE:
        raise KeyFileError(f"{path} is too large to be a {what}")
    return data


def _check_cert(pem: bytes, path: str) -> str:
    """Exactly one PEM certificate that OpenSSL can load; return it as text."""
    try:
        text = pem.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path} is not a PEM certificate") from None
    if text.count("-----BEGIN CERTIFICATE-----") != 1 or "PRIVATE KEY" in text:
        raise KeyFileError(f"{path} must hold exactly one PEM certificate (and no private key)")
    try:
        ssl.create_default_context(cadata=text)
        ssl.PEM_cert_to_DER_cert(text.strip() + "\n")
    except (ssl.SSLError, ValueError) as e:
        raise KeyFileError(f"{path} is not a usable certificate: {e}") from None
    return text


def read_psk(path: str) -> tuple[str, str]:
    """The ``(username, hex key)`` of a one-line ``keys.psk`` (or a file holding only the hex key).

    :raise KeyFileError: missing, unreadable or malformed; the key itself is never in the message
    """
    data = _read_small(path, "NBD key")
    try:
        lines = [line.strip() for line in data.decode("ascii").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: an NBD key file is ASCII text") from None
    if len(lines) != 1:
        raise KeyFileError(f"{path}: expected one line \"name:hexkey\", found {len(lines)}")
    user, sep, key = lines[0].rpartition(":")
    key = key.lower()
    if (sep and not valid_name(user)) or not _HEX.fullmatch(key) or len(key) % 2 or len(key) < 32:
        raise KeyFileError(f"{path}: expected \"name:hexkey\" with at least 16 bytes of key in hex")
    return user, key


@dataclass(frozen=True)
class PeerKeys:
    """What the agent uses for one TLS peer."""

    name: str
    cert_pem: str           # the pinned certificate
    cert_fingerprint: str
    psk_dir: str            # dir of the NBD client object (holds keys.psk)
    psk: str                # hex key; only ever written to files QEMU reads


class KeysDir:
    """One agent's ``keys_dir``: creates, imports and checks its files."""

    def __init__(self, path: str, name: str, *, gid: int | None | bool = True) -> None:
        """:param gid: group of the peer directories and NBD keys; True looks up ``libvirt-qemu``"""
        if not valid_name(name):
            raise KeyFileError(f"not an agent name: {name!r:.80}")
        self.path = path
        self.name = name
        self.gid = qemu_gid() if gid is True else (None if gid is False else gid)

    # -- paths -----------------------------------------------------------------------

    @property
    def key_path(self) -> str:
        return os.path.join(self.path, IDENTITY_KEY)

    @property
    def cert_path(self) -> str:
        return os.path.join(self.path, IDENTITY_CERT)

    def peer_dir(self, peer: str) -> str:
        if not valid_name(peer):
            raise KeyFileError(f"not a peer name: {peer!r:.80}")
        if peer == self.name:
            raise KeyFileError(f"{peer} is this host's own name, not a peer")
        return os.path.join(self.path, peer)

    def peer_cert_path(self, peer: str) -> str:
        return os.path.join(self.peer_dir(peer), PEER_CERT)

    def psk_path(self, peer: str) -> str:
        return os.path.join(self.peer_dir(peer), PSK_FILE)

    # -- creating --------------------------------------------------------------------

    def _dir_mode(self) -> int:
        return 0o750 if self.gid is not None else 0o700

    def _ensure_dir(self, path: str) -> None:
        """Create (or tighten) a key directory: 0700, or 0750 with the QEMU group.

        Missing parents are made 0755 (like /etc/virtsync): QEMU must be able to pass through.
        """
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise KeyFileError(f"{path} is not a directory")
        if self.gid is not None and st.st_gid != self.gid:
            os.chown(path, -1, self.gid)
        if stat.S_IMODE(st.st_mode) != self._dir_mode():
            os.chmod(path, self._dir_mode())

    def _write(self, path: str, data: bytes, *, secret: bool) -> None:
        """Atomically replace ``path``: temporary file (never more open than meant), fsync, rename."""
        directory = os.path.dirname(path)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)  # created 0600
        try:
            if secret and self.gid is not None:
                os.fchown(fd, -1, self.gid)
                os.fchmod(fd, 0o640)
            elif not secret:
                os.fchmod(fd, 0o644)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def ensure_identity(self, *, renew: bool = False) -> bool:
        """Create this agent's key and self-signed certificate unless both exist; True if created.

        :raise KeyFileError: ``openssl`` is missing or failed
        """
        self._ensure_dir(self.path)
        if not renew and os.path.exists(self.key_path) and os.path.exists(self.cert_path):
            self.check_identity()
            return False
        openssl = shutil.which("openssl")
        if openssl is None:
            raise KeyFileError("openssl not found: install the openssl package to create TLS keys")
        work = tempfile.mkdtemp(prefix=".new-", dir=self.path)  # 0700
        try:
            key, cert = os.path.join(work, IDENTITY_KEY), os.path.join(work, IDENTITY_CERT)
            # The key is generated by openssl itself into a 0700 directory under umask 077: it is
            # never on a command line and never more open than 0600.
            proc = subprocess.run(
                [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", key, "-out", cert, "-days", str(CERT_DAYS), "-subj", f"/CN={self.name}",
                 "-addext", "basicConstraints=critical,CA:FALSE",
                 "-addext", "keyUsage=critical,digitalSignature",
                 "-addext", "extendedKeyUsage=serverAuth,clientAuth"],
                stdin=subprocess.DEVNULL, capture_output=True, umask=0o077, timeout=60, check=False)
            if proc.returncode != 0:
                raise KeyFileError(f"openssl could not create a key: {proc.stderr.decode(errors='replace')[-300:]}")
            os.chmod(key, 0o600)
            os.chmod(cert, 0o644)
            # Certificate first: a crash in between leaves a key without a certificate, which
            # check_identity reports and the next init replaces.
            os.replace(cert, self.cert_path)
            os.replace(key, self.key_path)
            dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return True

    def ensure_psk(self, peer: str) -> bool:
        """Create the NBD key shared with ``peer`` unless it exists; True if created."""
        self._ensure_dir(self.path)
        self._ensure_dir(self.peer_dir(peer))
        if os.path.exists(self.psk_path(peer)):
            self.peer_psk(peer)
            return False
        self._write(self.psk_path(peer), f"{self.name}:{secrets.token_hex(PSK_BYTES)}\n".encode(), secret=True)
        return True

    def import_psk(self, peer: str, source: str) -> bool:
        """Take the pair's NBD key from ``source`` (the peer's ``keys.psk`` for us, any user name,
        or a bare hex key); store it under this host's name. True if it changed."""
        _, key = read_psk(source)
        self._ensure_dir(self.path)
        self._ensure_dir(self.peer_dir(peer))
        with contextlib.suppress(KeyFileError):
            if self.peer_psk(peer) == key:
                return False
        self._write(self.psk_path(peer), f"{self.name}:{key}\n".encode(), secret=True)
        return True

    def import_cert(self, peer: str, source: str) -> tuple[str, bool]:
        """Pin ``source`` as ``peer``'s certificate; return its fingerprint and whether it changed."""
        text = _check_cert(_read_small(source, "certificate"), source)
        if fingerprint(text) == self.fingerprint():
            raise KeyFileError(f"{source} is this host's own certificate, not {peer}'s")
        self._ensure_dir(self.path)
        self._ensure_dir(self.peer_dir(peer))
        path = self.peer_cert_path(peer)
        old = None
        with contextlib.suppress(OSError):
            with open(path) as f:
                old = f.read()
        if old == text:
            return fingerprint(text), False
        self._write(path, text.encode(), secret=False)
        return fingerprint(text), True

    # -- reading and checking -------------------------------------------------------------

    def _check_private(self, path: str, *, group_ok: bool) -> None:
        """Refuse a secret that others could read (or its group could, when that is not meant)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise KeyFileError(f"{path} is missing") from None
        mode = stat.S_IMODE(st.st_mode)
        allowed = 0o640 if group_ok and self.gid is not None and st.st_gid == self.gid else 0o600
        if mode & ~allowed:
            raise KeyFileError(f"{path} is too open (mode {mode:04o}): chmod {allowed:04o} it")

    def _check_dir(self, path: str) -> None:
        """Refuse a key directory others may write to (as ssh's StrictModes does): anyone could
        swap a pinned certificate or a key there."""
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            return
        if mode & 0o022:
            raise KeyFileError(f"{path} is writable by others (mode {mode:04o}): anyone could replace its keys; "
                               f"chmod {self._dir_mode():04o} it")

    def check_identity(self) -> None:
        self._check_dir(self.path)
        if not os.path.exists(self.key_path) or not os.path.exists(self.cert_path):
            raise KeyFileError(f"no TLS identity in {self.path}: run 'virtsync keys init PEER' "
                               "(or set insecure_plain = true for every peer on an isolated network)")
        self._check_private(self.key_path, group_ok=False)
        _check_cert(_read_small(self.cert_path, "certificate"), self.cert_path)

    def fingerprint(self) -> str | None:
        try:
            with open(self.cert_path) as f:
                return fingerprint(f.read())
        except (OSError, ValueError):
            return None

    def peer_psk(self, peer: str) -> str:
        path = self.psk_path(peer)
        if not os.path.exists(path):
            raise KeyFileError(f"no NBD key for peer {peer} ({path}): run 'virtsync keys init {peer}' on one "
                               f"host and 'virtsync keys import' on the other")
        self._check_private(path, group_ok=True)
        _, key = read_psk(path)
        return key

    def peer(self, peer: str) -> PeerKeys:
        """Everything the agent needs for a TLS peer.

        :raise KeyFileError: the pinned certificate or the NBD key is missing or unusable
        """
        self._check_dir(self.path)
        self._check_dir(self.peer_dir(peer))
        path = self.peer_cert_path(peer)
        if not os.path.exists(path):
            raise KeyFileError(f"no certificate pinned for peer {peer} ({path}): copy its "
                               f"{self.path}/{IDENTITY_CERT} here and run 'virtsync keys import {peer} --cert FILE'")
        text = _check_cert(_read_small(path, "certificate"), path)
        return PeerKeys(peer, text, fingerprint(text), self.peer_dir(peer), self.peer_psk(peer))


def write_server_psk(directory: str, keys: dict[str, str]) -> str:
    """The qemu-storage-daemon's ``keys.psk``: one ``<peer>:<key>`` line per peer. Returns the dir.

    Only the agent's own qemu-storage-daemon (same user) reads it: 0700 directory, 0600 file.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    path = os.path.join(directory, PSK_FILE)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            for peer, key in sorted(keys.items()):
                f.write(f"{peer}:{key}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return directory
