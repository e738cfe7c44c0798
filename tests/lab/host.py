"""Simulated hosts for the e2e tier: one libvirtd per network + mount namespace.

A :class:`LabHost` is a network namespace (``vslab-<id>``) holding a private
mount namespace in which the host's own ``virtlogd`` and ``libvirtd`` run over
bind mounts of private copies of ``/etc/libvirt``, ``/run/libvirt``,
``/var/lib/libvirt``, ``/var/log/libvirt`` and ``/var/cache/libvirt`` (the
LAB.md recipe). :func:`link_hosts` joins two hosts with a veth pair on a
private test subnet, so they have distinct addresses and a link tests can cut
(:mod:`tests.lab.netfault`).

Each host has a tiny init (a child subreaper) that makes the mounts, starts
the daemons and reaps orphans at once: this machine's pid 1 reaps only every
~1.5 s, and libvirt waits for QEMU to be reaped on every destroy.

Teardown is by pid only: the daemons we started, the QEMU pid files under the
host's run dir, and whatever else still lives in the host's own network
namespace (everything in it descends from us). An ``atexit`` hook stops hosts a
failed test left behind, and :func:`reap_stale` cleans up after a killed run.
The only trace on the machine is the QEMU capabilities cache (``CAPS_CACHE``)
and, if it was missing, the empty mount point ``/run/libvirt``.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

__all__ = [
    "LabError",
    "LabHost",
    "LabLink",
    "NETNS_PREFIX",
    "lab_prerequisites",
    "link_hosts",
    "live_hosts",
    "reap_stale",
    "running_hosts",
]

_log = logging.getLogger(__name__)

NETNS_PREFIX = "vslab-"
NETNS_DIR = Path("/run/netns")
PRIVATE_DIRS = ("etc/libvirt", "run/libvirt", "var/lib/libvirt", "var/log/libvirt", "var/cache/libvirt")
LAB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REQUIRED_TOOLS = ("libvirtd", "virtlogd", "virsh", "ip", "nsenter", "unshare", "mount", "busybox")
READY_TIMEOUT = 20.0
KEEP_ENV = "VSLAB_KEEP"  # set to 1 to keep a stopped host's root dir (logs) for debugging
# Probing QEMU takes libvirtd ~4 s per emulator binary on the first capabilities
# lookup. The probe results are kept between hosts and runs; libvirtd re-validates
# them (binary ctime, its own version, kernel, microcode) and re-probes when stale.
CAPS_CACHE = Path(os.environ.get("VSLAB_CAPS_CACHE", Path.home() / ".cache/virtsync-lab/libvirt-qemu-caps"))
_CAPS_REL = "var/cache/libvirt/qemu/capabilities"

# The host's init, run by ``ip netns exec NS unshare -m --propagation private
# python -I -c INIT ROOT [libvirtd args]``: it makes the private bind mounts,
# starts virtlogd and libvirtd, and reaps every orphan as a child subreaper.
# Without it QEMU (daemonized by libvirtd) is reaped by the machine's pid 1,
# which here does so only every ~1.5 s, and libvirt waits for that reaping on
# every destroy. SIGUSR1 (re)starts libvirtd after a test killed it.
_INIT_CODE = r"""
import ctypes, os, signal, sys, time
root, extra = sys.argv[1], sys.argv[2:]
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
def run(*argv):
    pid = os.posix_spawnp(argv[0], argv, os.environ)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        sys.exit(f"{argv} failed")
for d in ("etc/libvirt", "run/libvirt", "var/lib/libvirt", "var/log/libvirt", "var/cache/libvirt"):
    os.makedirs("/" + d, exist_ok=True)
    run("mount", "--bind", f"{root}/{d}", "/" + d)
# Guests fail to start without a virtlogd; its default pid file would be the machine's.
run("virtlogd", "--daemon", "--pid-file", "/run/libvirt/virtlogd.pid")
status = os.path.join(root, "libvirtd.status")
libvirtd = 0
def start(*_):
    global libvirtd
    if not libvirtd:
        try:
            os.unlink(status)
        except FileNotFoundError:
            pass
        argv = ["libvirtd", "--pid-file", "/run/libvirt/libvirtd.pid", *extra]
        libvirtd = os.posix_spawnp(argv[0], argv, os.environ)
signal.signal(signal.SIGUSR1, start)
start()
while True:
    try:
        pid, code = os.wait()
    except ChildProcessError:
        time.sleep(0.05)
        continue
    if pid == libvirtd:
        libvirtd = 0
        with open(status + ".tmp", "w") as f:
            f.write(str(os.waitstatus_to_exitcode(code)))
        os.replace(status + ".tmp", status)
"""

_live: dict[str, LabHost] = {}
_subnets = itertools.count()


class LabError(RuntimeError):
    """The lab could not build, run or tear down a host."""


@dataclass(frozen=True, slots=True)
class LabLink:
    """One end of a veth pair inside a host's netns."""

    ifname: str
    address: str
    prefixlen: int
    peer: str


def lab_prerequisites() -> str | None:
    """Why the lab cannot run here, or None when it can (for pytest skips)."""
    if os.geteuid() != 0:
        return "lab hosts need root (network and mount namespaces, libvirtd)"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool, path=LAB_PATH) is None]
    if missing:
        return f"lab hosts need {', '.join(missing)} (libvirt-daemon-system, libvirt-clients, iproute2, busybox)"
    if not Path("/etc/libvirt/libvirtd.conf").exists():
        return "lab hosts seed their config from /etc/libvirt (libvirt-daemon-system)"
    return None


def _clean_env() -> dict[str, str]:
    """Our environment without anything that would redirect libvirt or virsh."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIBVIRT_", "VIRSH_"))}
    env["PATH"] = LAB_PATH
    env.setdefault("LC_ALL", "C")
    return env


def _proc_start_time(pid: int) -> str:
    """The process start time in clock ticks: with the pid, names a process uniquely."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_and_wait(pids: Sequence[int], sig: int = signal.SIGKILL, timeout: float = 5.0) -> list[int]:
    """Signal ``pids`` and wait until they are gone; return the survivors."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    left = [pid for pid in pids if _alive(pid)]
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        left = [pid for pid in left if _alive(pid)]
    return left


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (zombies included)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def _wait_children_reaped(pid: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while _children(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _netns_pids(name: str) -> list[int]:
    """Every process whose network namespace is the named one."""
    try:
        ns = os.stat(NETNS_DIR / name)
    except OSError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (ns.st_dev, ns.st_ino):
            found.append(int(entry))
    return found


def _end_netns(name: str, init: int | None = None) -> None:
    """Kill what still runs in the netns, then delete the netns.

    With the host's ``init`` known, it goes last, after it has reaped the
    others, so that no zombie is left to the machine's slow pid 1.
    """
    if init is not None and init in _netns_pids(name):
        _kill_and_wait([p for p in _netns_pids(name) if p != init])
        _wait_children_reaped(init)
    left = _kill_and_wait(_netns_pids(name))
    if left:
        _log.warning("lab netns %s: processes survived SIGKILL: %s", name, left)
    if (NETNS_DIR / name).exists():
        pr_netns.remove(name)


def _set_conf(path: Path, values: dict[str, str]) -> None:
    """Set ``key = value`` lines in a libvirt conf file, dropping earlier settings of those keys."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.split("=", 1)[0].strip() not in values]
    kept.append("# set by tests.lab.host")
    kept.extend(f"{key} = {value}" for key, value in values.items())
    path.write_text("\n".join(kept) + "\n")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class LabHost:
    """A simulated host: own netns, own mount namespace, own libvirtd and virtlogd.

    Create, :func:`link_hosts` (before starting: qemu.conf takes the lab
    address), then :meth:`start`; :meth:`stop` always, even after failures.

    :param name: a label for messages and veth names ("pri", "sec")
    :param listen_tcp: also serve ``qemu+tcp://ADDRESS/system`` (no auth; lab only),
        bound to the host's lab address, never to a wildcard
    :param base_dir: where the host's root dir goes (short paths: the daemon's
        sockets live there and AF_UNIX paths are limited to 107 bytes)
    """

    def __init__(self, name: str = "host", *, listen_tcp: bool = False, base_dir: str | None = None) -> None:
        self.name = name
        self.id = secrets.token_hex(3)
        self.netns = NETNS_PREFIX + self.id
        self.host_uuid = str(uuid.uuid4())
        self.listen_tcp = listen_tcp
        self.links: list[LabLink] = []
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.netns}-", dir=base_dir or "/tmp"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        _live[self.netns] = self
        try:
            (self.root / "owner").write_text(f"{os.getpid()} {_proc_start_time(os.getpid())} {self.netns}\n")
            pr_netns.create(self.netns)
            with IPRoute(netns=self.netns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        except BaseException:
            self.stop()
            raise

    def __repr__(self) -> str:
        return f"<LabHost {self.name} netns={self.netns} address={self.address}>"

    def __enter__(self) -> LabHost:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- addresses and paths -------------------------------------------------

    @property
    def address(self) -> str:
        """The first lab address (127.0.0.1, private to the netns, before any link)."""
        return self.links[0].address if self.links else "127.0.0.1"

    @property
    def socket_path(self) -> Path:
        return self.root / "run/libvirt/libvirt-sock"

    @property
    def uri(self) -> str:
        """Connect from outside the namespaces, through the daemon's private socket."""
        return f"qemu:///system?socket={self.socket_path}"

    @property
    def tcp_uri(self) -> str:
        if not self.listen_tcp:
            raise LabError(f"{self.name}: started without listen_tcp")
        return f"qemu+tcp://{self.address}/system"

    @property
    def init_pid(self) -> int:
        """The host's init (subreaper): its namespaces are the host's, for its whole life."""
        if self._proc is None or self._proc.poll() is not None:
            raise LabError(f"{self.name}: not running")
        return self._proc.pid

    @property
    def libvirtd_pid(self) -> int:
        """The running libvirtd's pid (changes across :meth:`restart_libvirtd`)."""
        pid = self._read_pid("run/libvirt/libvirtd.pid")
        if pid is None or not _alive(pid) or (self.root / "libvirtd.status").exists():
            raise LabError(f"{self.name}: libvirtd is not running")
        return pid

    @property
    def virtlogd_pid(self) -> int | None:
        return self._read_pid("run/libvirt/virtlogd.pid")

    @property
    def running(self) -> bool:
        """The host's init is alive (libvirtd itself may have been killed by a test)."""
        return self._proc is not None and self._proc.poll() is None

    def add_link(self, link: LabLink) -> None:
        """Record a veth end configured in this netns (used by :func:`link_hosts`)."""
        self.links.append(link)

    # --- lifecycle ------------------------------------------------------------

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start virtlogd and libvirtd and wait until libvirtd serves clients."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Seed the private dirs and spawn the daemons; do not wait (start hosts in parallel)."""
        if self._stopped:
            raise LabError(f"{self.name}: already stopped")
        if self._proc is not None:
            raise LabError(f"{self.name}: already started")
        self._seed()
        argv = ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private",
                sys.executable, "-I", "-c", _INIT_CODE, str(self.root)]
        if self.listen_tcp:
            argv.append("--listen")
        with open(self.root / "daemons.out", "ab") as out:
            # ip netns exec and unshare exec (no fork): the child's pid is the init's.
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          env=_clean_env(), start_new_session=True)
        (self.root / "init.pid").write_text(f"{self._proc.pid}\n")  # for reap_stale

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll the daemon's socket until it accepts, then wait for its drivers."""
        if self._proc is None:
            raise LabError(f"{self.name}: not launched")
        status = self.root / "libvirtd.status"
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise LabError(f"{self.name}: lab init exited with {self._proc.returncode}\n{self.diagnostics()}")
            if status.exists():
                raise LabError(f"{self.name}: libvirtd exited with {status.read_text()}\n{self.diagnostics()}")
            if self.socket_path.exists():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    try:
                        sock.connect(str(self.socket_path))
                        break
                    except OSError:
                        pass  # not listening yet, or a socket left by a killed libvirtd
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: libvirtd not ready after {timeout}s\n{self.diagnostics()}")
            time.sleep(0.02)
        # The socket accepts before the drivers initialise; one call waits for that
        # and fails if initialisation failed (libvirtd then exits).
        res = self._run(["virsh", "-c", self.uri, "uri"], check=False, timeout=max(deadline - time.monotonic(), 1))
        if res.returncode != 0:
            raise LabError(f"{self.name}: libvirtd failed to initialise: {res.stderr.strip()}\n{self.diagnostics()}")

    def kill_libvirtd(self, sig: int = signal.SIGKILL) -> None:
        """End libvirtd only (guests keep running), as a crash or an upgrade would."""
        pid = self.libvirtd_pid
        if _kill_and_wait([pid], sig, timeout=10.0):
            raise LabError(f"{self.name}: libvirtd {pid} survived signal {sig}")
        deadline = time.monotonic() + 5.0
        while not (self.root / "libvirtd.status").exists():  # the init has reaped it
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: libvirtd {pid} not reaped")
            time.sleep(0.01)

    def restart_libvirtd(self, timeout: float = READY_TIMEOUT) -> None:
        """Start libvirtd again after :meth:`kill_libvirtd` (it reconnects to its guests)."""
        # Drop the old exit status first, or wait_ready could read it before the init does.
        (self.root / "libvirtd.status").unlink(missing_ok=True)
        os.kill(self.init_pid, signal.SIGUSR1)
        self.wait_ready(timeout)

    def stop(self) -> None:
        """Destroy the domains, end every process of this host, delete the netns.

        Idempotent and best effort at each step, so one failure does not leave
        the rest behind.
        """
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.running and not (self.root / "libvirtd.status").exists():
                try:
                    self._destroy_domains()
                except (LabError, subprocess.SubprocessError, OSError) as e:
                    _log.warning("%s: destroying domains failed: %s", self.name, e)
            init = self._proc.pid if self.running and self._proc is not None else None
            ours = set(_netns_pids(self.netns))  # a stale pid file may name a stranger
            daemons = [p for p in (self._read_pid("run/libvirt/libvirtd.pid"), self.virtlogd_pid) if p in ours]
            _kill_and_wait([p for p in daemons if p is not None], signal.SIGTERM, timeout=3.0)
            # QEMU by its pid files, then anything else left (the init reaps them all).
            _kill_and_wait([p for p in self._pid_file_pids() if p in ours], signal.SIGKILL)
            _kill_and_wait([p for p in _netns_pids(self.netns) if p != init], signal.SIGKILL)
            if init is not None:
                _wait_children_reaped(init)  # else the machine's pid 1 inherits the zombies
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait(5.0)
            _end_netns(self.netns)
            try:
                self._save_caps()
            except OSError as e:
                _log.warning("%s: cannot keep the QEMU capabilities cache: %s", self.name, e)
        finally:
            _live.pop(self.netns, None)
            if os.environ.get(KEEP_ENV) == "1":
                _log.warning("%s: keeping %s", self.name, self.root)
            else:
                shutil.rmtree(self.root, ignore_errors=True)

    # --- running things inside ------------------------------------------------

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside both namespaces of this host's libvirtd (``nsenter -m -n``)."""
        return self._run(["nsenter", "-t", str(self.init_pid), "-m", "-n", *argv],
                         check=check, timeout=timeout, input=input)

    def netns_run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
                  input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this host's netns only (works before start; sees the machine's /etc)."""
        return self._run(["ip", "netns", "exec", self.netns, *argv], check=check, timeout=timeout, input=input)

    def virsh(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        """Run plain ``virsh`` against this host's daemon; return stdout."""
        return self.run(["virsh", "-c", "qemu:///system", *args], check=check, timeout=timeout).stdout

    def ping(self, address: str, timeout_s: int = 1) -> bool:
        """One ICMP echo from this host's netns (busybox: Debian's image has no ping)."""
        res = self.netns_run(["busybox", "ping", "-c", "1", "-W", str(timeout_s), address],
                             check=False, timeout=timeout_s + 5)
        return res.returncode == 0

    def diagnostics(self, lines: int = 30) -> str:
        """The tail of the daemons' output and libvirtd's log, for error messages."""
        parts = []
        for rel in ("daemons.out", "var/log/libvirt/libvirtd.log"):
            path = self.root / rel
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {rel}\n" + "\n".join(tail))
        return "\n".join(parts)

    # --- internals --------------------------------------------------------------

    @staticmethod
    def _run(argv: Sequence[str], *, check: bool, timeout: float,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                             env=_clean_env(), input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise LabError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()[:800]}")
        return res

    def _seed(self) -> None:
        """Private copies of the machine's libvirt dirs, with this host's identity.

        Only the daemon config files are copied: never the machine's domains,
        networks or pools, so a lab host starts empty.
        """
        for rel in PRIVATE_DIRS:
            (self.root / rel).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc/libvirt"
        for src in Path("/etc/libvirt").glob("*.conf"):
            shutil.copy2(src, etc / src.name)
        if Path("/etc/libvirt/nwfilter").is_dir():
            shutil.copytree("/etc/libvirt/nwfilter", etc / "nwfilter", dirs_exist_ok=True)
        for rel in ("qemu", "hooks", "storage"):
            (etc / rel).mkdir(exist_ok=True)
        if CAPS_CACHE.is_dir():
            shutil.copytree(CAPS_CACHE, self.root / _CAPS_REL, dirs_exist_ok=True)
        daemon_conf = {
            "host_uuid": _quote(self.host_uuid),
            "log_outputs": _quote("3:file:/var/log/libvirt/libvirtd.log"),
            "listen_tls": "0",
            "listen_tcp": "1" if self.listen_tcp else "0",
        }
        if self.listen_tcp:
            daemon_conf |= {"listen_addr": _quote(self.address), "auth_tcp": _quote("none")}
        _set_conf(etc / "libvirtd.conf", daemon_conf)
        _set_conf(etc / "virtlogd.conf", {"log_outputs": _quote("3:file:/var/log/libvirt/virtlogd.log")})
        _set_conf(etc / "qemu.conf", {
            # Root QEMU needs no relabelling of files in pytest tmp dirs (lab only).
            "user": _quote("root"),
            "group": _quote("root"),
            "dynamic_ownership": "0",
            "remember_owner": "0",
            "security_driver": _quote("none"),
            # Inside ip netns exec /sys is remounted without cgroups; say so explicitly.
            "cgroup_controllers": "[ ]",
        } | ({
            # The destination QEMU listens on the lab address only (no wildcard).
            # libvirtd refuses a loopback migration_host, so unlinked hosts get none.
            "migration_address": _quote(self.address),
            "migration_host": _quote(self.address),
        } if self.links else {}))

    def _save_caps(self) -> None:
        """Keep libvirtd's QEMU probe results for the next host (atomic per file)."""
        produced = self.root / _CAPS_REL
        if not produced.is_dir():
            return
        CAPS_CACHE.mkdir(parents=True, exist_ok=True)
        for src in produced.glob("*.xml"):
            dst = CAPS_CACHE / src.name
            if dst.exists() and dst.read_bytes() == src.read_bytes():
                continue
            tmp = dst.with_name(f".{dst.name}.{self.id}.partial")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)

    def _read_pid(self, rel: str) -> int | None:
        try:
            return int((self.root / rel).read_text().strip())
        except (OSError, ValueError):
            return None

    def _pid_file_pids(self) -> list[int]:
        """QEMU (and daemon) pids from the pid files under this host's run dir."""
        pids = []
        for path in (self.root / "run/libvirt").rglob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(path.read_text().strip()))
        return pids

    def _destroy_domains(self) -> None:
        names = [n for n in self.virsh("list", "--name", timeout=10).split() if n]
        for name in names:
            self.virsh("destroy", name, check=False, timeout=20)


def link_hosts(a: LabHost, b: LabHost, subnet: str | None = None) -> tuple[str, str]:
    """Join two hosts with a veth pair; return their addresses on it.

    Each netns is private, so the default subnets (10.250.<k>.0/24) may repeat
    across concurrent runs. Link before starting: qemu.conf takes the address.
    """
    for host in (a, b):
        if host._proc is not None:
            raise LabError(f"{host.name}: link hosts before starting them (qemu.conf takes the address)")
    net = ipaddress.ip_network(subnet or f"10.250.{next(_subnets) % 256}.0/24")
    it = net.hosts()
    addr_a, addr_b = str(next(it)), str(next(it))
    if_a, if_b = f"vs{a.id}-{b.id}", f"vs{b.id}-{a.id}"  # 15 chars: IFNAMSIZ - 1
    with IPRoute() as ipr:
        ipr.link("add", ifname=if_a, kind="veth", peer=if_b)
        try:
            ipr.link("set", index=ipr.link_lookup(ifname=if_a)[0], net_ns_fd=a.netns)
            ipr.link("set", index=ipr.link_lookup(ifname=if_b)[0], net_ns_fd=b.netns)
        except BaseException:
            for name in (if_a, if_b):
                with contextlib.suppress(Exception):
                    ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
            raise
    for host, ifname, address, peer in ((a, if_a, addr_a, b), (b, if_b, addr_b, a)):
        with IPRoute(netns=host.netns) as ipr:
            index = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=index, address=address, prefixlen=net.prefixlen)
            ipr.link("set", index=index, state="up")
        host.add_link(LabLink(ifname, address, net.prefixlen, peer.name))
    return addr_a, addr_b


@contextlib.contextmanager
def running_hosts(*names: str, listen_tcp: bool = False) -> Iterator[list[LabHost]]:
    """Hosts named ``names``, linked pairwise (full mesh), started in parallel.

    Every host made is stopped on leaving, also after a failure or Ctrl-C.
    """
    hosts: list[LabHost] = []
    try:
        for name in names:
            hosts.append(LabHost(name, listen_tcp=listen_tcp))
        for i, a in enumerate(hosts):
            for b in hosts[i + 1:]:
                link_hosts(a, b)
        for host in hosts:   # launch every daemon first, then wait
            host.launch()
        for host in hosts:
            host.wait_ready()
        yield hosts
    finally:
        for host in hosts:
            host.stop()


def live_hosts() -> Iterator[LabHost]:
    """Hosts started in this process and not yet stopped."""
    return iter(list(_live.values()))


@atexit.register
def _stop_all() -> None:
    """Safety net: a test that failed before its finalizer leaves nothing behind."""
    for host in list(_live.values()):
        try:
            host.stop()
        except Exception as e:  # noqa: BLE001 - best effort at interpreter exit
            _log.warning("stopping %r at exit failed: %s", host, e)


def reap_stale(base_dir: str = "/tmp") -> list[str]:
    """Remove lab hosts whose owning process is gone (a killed test run).

    Hosts owned by a live process (another run) are left alone.
    :return: the netns names removed
    """
    removed = []
    for root in Path(base_dir).glob(f"{NETNS_PREFIX}*"):
        try:
            pid_s, start, name = (root / "owner").read_text().split()
        except (OSError, ValueError):
            continue
        pid = int(pid_s)
        if _alive(pid) and _proc_start_time(pid) == start:
            continue
        if name.startswith(NETNS_PREFIX):
            init = None
            with contextlib.suppress(OSError, ValueError):
                init = int((root / "init.pid").read_text())
            _end_netns(name, init)
            removed.append(name)
        shutil.rmtree(root, ignore_errors=True)
    return removed
