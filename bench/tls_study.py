"""``python -m bench.tls_study``: the cost of TLS on the NBD data path.

Copies a raw image full of random (non-zero) data with ``qemu-img convert -n``
into an ``nbd`` export of ``qemu-storage-daemon`` on 127.0.0.1, and measures
the wall time and the CPU seconds of both ends (client: ``qemu-img``'s rusage
from ``wait4``; server: ``utime + stime`` of the daemon from
``/proc/<pid>/stat``, read just before and just after the copy; a fresh daemon
for every copy). Contenders:

- ``plain``: no TLS (the baseline);
- ``psk``: ``tls-creds-psk``, default priority;
- ``psk-aes128gcm`` / ``psk-aes256gcm-tls12`` / ``psk-chacha20``:
  ``tls-creds-psk`` with an explicit GnuTLS ``priority=`` limiting the cipher
  to one AEAD (AES-256-GCM only works over TLS 1.2 with a PSK, see below);
- ``x509``: ``tls-creds-x509`` (own CA, server cert with an IP SAN
  127.0.0.1, client cert, ``verify-peer=on``), default priority;

then, with the cheapest TLS contender, two half-size disks copied one after
the other vs in parallel (one daemon, two exports, two ``qemu-img``).

All in one run; each repetition runs every contender once, in a rotating
order (interleaved). Images live in a temp dir (``/dev/shm`` when present, so
the disk does not take part); the dir and all processes are removed at the
end, also on error or Ctrl-C. stdlib + subprocess only. Never a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB
CLK_TCK = os.sysconf("SC_CLK_TCK")
QSD = "qemu-storage-daemon"
QEMU_IMG = "qemu-img"

# name -> (creds kind, priority or None)
CONTENDERS: dict[str, tuple[str | None, str | None]] = {
    "plain": (None, None),
    "psk": ("psk", None),
    "psk-aes128gcm": ("psk", "NORMAL:-CIPHER-ALL:+AES-128-GCM"),
    # TLS 1.3 + external PSK in GnuTLS is bound to SHA-256, so
    # TLS_AES_256_GCM_SHA384 cannot be used ("NORMAL:-CIPHER-ALL:+AES-256-GCM"
    # fails the handshake: "No supported cipher suites"); AES-256-GCM with a
    # PSK needs TLS 1.2.
    "psk-aes256gcm-tls12": ("psk", "NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+AES-256-GCM"),
    "psk-chacha20": ("psk", "NORMAL:-CIPHER-ALL:+CHACHA20-POLY1305"),
    "x509": ("x509", None),
}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def proc_cpu(pid: int) -> float:
    """utime + stime of a live process, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    want = f":{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1].endswith(want) and parts[3] == "0A":
            return True
    return False


def run(cmd: list[str], **kw) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def make_image(path: Path, size: int) -> None:
    """Random, incompressible, non-zero data (no zero clusters to skip)."""
    chunk = 4 * MiB
    with open(path, "wb") as f:
        for _ in range(size // chunk):
            f.write(os.urandom(chunk))


def make_creds(root: Path) -> dict[str, tuple[Path, Path]]:
    """{kind: (server dir, client dir)} for psk and x509."""
    creds: dict[str, tuple[Path, Path]] = {}
    psk = root / "psk"
    psk.mkdir()
    if shutil.which("psktool"):
        run(["psktool", "-u", "qemu", "-p", str(psk / "keys.psk")])
    else:
        (psk / "keys.psk").write_text(f"qemu:{os.urandom(32).hex()}\n")
    creds["psk"] = (psk, psk)

    x = root / "x509"
    srv, cli = x / "server", x / "client"
    srv.mkdir(parents=True)
    cli.mkdir()
    tmpl = x / "tmpl"

    def certtool(*args: str, template: str | None = None) -> None:
        cmd = ["certtool", *args]
        if template is not None:
            tmpl.write_text(template)
            cmd += ["--template", str(tmpl)]
        run(cmd)

    # ECDSA P-256 keys: the handshake is once per connection; the bulk cipher
    # is what the copy pays for.
    for key in ("ca-key.pem", "server-key.pem", "client-key.pem"):
        certtool("--generate-privkey", "--key-type=ecdsa", "--curve=secp256r1",
                 "--outfile", str(x / key))
    certtool("--generate-self-signed", "--load-privkey", str(x / "ca-key.pem"),
             "--outfile", str(x / "ca-cert.pem"),
             template='cn = "virtsync bench CA"\nca\ncert_signing_key\nexpiration_days = 2\n')
    certtool("--generate-certificate", "--load-privkey", str(x / "server-key.pem"),
             "--load-ca-certificate", str(x / "ca-cert.pem"),
             "--load-ca-privkey", str(x / "ca-key.pem"),
             "--outfile", str(srv / "server-cert.pem"),
             template='cn = "127.0.0.1"\nip_address = "127.0.0.1"\ntls_www_server\n'
                      'signing_key\nencryption_key\nexpiration_days = 2\n')
    certtool("--generate-certificate", "--load-privkey", str(x / "client-key.pem"),
             "--load-ca-certificate", str(x / "ca-cert.pem"),
             "--load-ca-privkey", str(x / "ca-key.pem"),
             "--outfile", str(cli / "client-cert.pem"),
             template='cn = "virtsync bench client"\ntls_www_client\n'
                      'signing_key\nencryption_key\nexpiration_days = 2\n')
    for d in (srv, cli):
        shutil.copy(x / "ca-cert.pem", d / "ca-cert.pem")
    shutil.copy(x / "server-key.pem", srv / "server-key.pem")
    shutil.copy(x / "client-key.pem", cli / "client-key.pem")
    creds["x509"] = (srv, cli)
    return creds


def creds_object(kind: str, endpoint: str, d: Path, priority: str | None) -> str:
    obj = f"tls-creds-{kind},id=tls0,endpoint={endpoint},dir={d}"
    if kind == "psk" and endpoint == "client":
        obj += ",username=qemu"
    if kind == "x509" and endpoint == "server":
        obj += ",verify-peer=on"
    if priority:
        obj += f",priority={priority}"
    return obj


@dataclass
class Sample:
    wall: float
    cpu_client: float
    cpu_server: float
    nbytes: int

    @property
    def mibps(self) -> float:
        return self.nbytes / MiB / self.wall


@dataclass
class Lab:
    root: Path
    creds: dict[str, tuple[Path, Path]]
    procs: list[subprocess.Popen] = field(default_factory=list)

    @contextlib.contextmanager
    def server(self, contender: str, targets: list[Path]):
        """A qemu-storage-daemon exporting each target as e0, e1, ..."""
        kind, prio = CONTENDERS[contender]
        port = free_port()
        cmd = [QSD]
        addr = f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}"
        if kind:
            cmd += ["--object", creds_object(kind, "server", self.creds[kind][0], prio)]
            addr += ",tls-creds=tls0"
        for i, t in enumerate(targets):
            cmd += ["--blockdev", f"driver=file,node-name=f{i},filename={t}",
                    "--blockdev", f"driver=raw,node-name=n{i},file=f{i}"]
        cmd += ["--nbd-server", addr]
        for i in range(len(targets)):
            cmd += ["--export", f"type=nbd,id=e{i},node-name=n{i},name=e{i},writable=on"]
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        self.procs.append(p)
        try:
            deadline = time.monotonic() + 10
            while not listening(port):
                if p.poll() is not None:
                    raise RuntimeError(f"{QSD} died: {p.stderr.read().decode()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{QSD} does not listen on {port}")
                time.sleep(0.01)
            yield p, port
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self.procs.remove(p)

    def client_cmd(self, contender: str, src: Path, port: int, export: str) -> list[str]:
        kind, prio = CONTENDERS[contender]
        cmd = [QEMU_IMG, "convert", "-n", "-f", "raw", "--target-image-opts"]
        target = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={export}"
        if kind:
            cmd += ["--object", creds_object(kind, "client", self.creds[kind][1], prio)]
            target += ",tls-creds=tls0"
        return cmd + [str(src), target]

    def copy(self, contender: str, pairs: list[tuple[Path, Path]], parallel: bool) -> Sample:
        """Copy each (src, target) pair; all at once or one after the other.

        One daemon for all pairs (one export each). Server CPU is taken from
        just before the first client starts to just after the last one ends.
        """
        targets = [t for _, t in pairs]
        for t in targets:  # preallocate: -n needs the target to exist
            with open(t, "wb") as f:
                f.truncate(pairs[0][0].stat().st_size)
        with self.server(contender, targets) as (srv, port):
            cmds = [self.client_cmd(contender, s, port, f"e{i}")
                    for i, (s, _) in enumerate(pairs)]
            s0 = proc_cpu(srv.pid)
            t0 = time.monotonic()
            cpu_client = 0.0
            if parallel:
                kids = [subprocess.Popen(c, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                        for c in cmds]
                self.procs.extend(kids)
                for k in kids:
                    cpu_client += self._reap(k)
            else:
                for c in cmds:
                    k = subprocess.Popen(c, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                    self.procs.append(k)
                    cpu_client += self._reap(k)
            wall = time.monotonic() - t0
            cpu_server = proc_cpu(srv.pid) - s0
        nbytes = sum(s.stat().st_size for s, _ in pairs)
        for s, t in pairs:  # the copy must be exact
            if not same_file(s, t):
                raise RuntimeError(f"{contender}: {t.name} differs from {s.name}")
            t.unlink()
        return Sample(wall, cpu_client, cpu_server, nbytes)

    def _reap(self, k: subprocess.Popen) -> float:
        _, status, ru = os.wait4(k.pid, 0)
        k.returncode = os.waitstatus_to_exitcode(status)
        self.procs.remove(k)
        if k.returncode != 0:
            raise RuntimeError(f"qemu-img failed ({k.returncode}): {k.stderr.read().decode()}")
        k.stderr.close()
        return ru.ru_utime + ru.ru_stime

    def kill_all(self) -> None:
        for p in list(self.procs):
            if p.poll() is None:
                p.kill()
                p.wait()


def same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 * MiB), fb.read(8 * MiB)
            if x != y:
                return False
            if not x:
                return True


def mmm(xs: list[float], fmt: str) -> str:
    return (f"{format(statistics.median(xs), fmt)} "
            f"({format(min(xs), fmt)}–{format(max(xs), fmt)})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=512)
    args = ap.parse_args(argv)

    size = args.size_mib * MiB
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    root = Path(tempfile.mkdtemp(prefix="virtsync-tls-", dir=base))
    lab = Lab(root, {})
    old_int = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return study(lab, size, args.reps)
    finally:
        lab.kill_all()
        shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGTERM, old_int)


def study(lab: Lab, size: int, reps: int) -> int:
    t_start = time.monotonic()
    cpuinfo = Path("/proc/cpuinfo").read_text()
    aesni = any(line.startswith("flags") and " aes " in f" {line} " for line in cpuinfo.splitlines())
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), "?")
    qver = subprocess.run([QEMU_IMG, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    gver = subprocess.run(["certtool", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(f"# {qver}; {gver}; CPU: {model} x{os.cpu_count()}; AES-NI: {'yes' if aesni else 'no'}")
    print(f"# load average before: {loadavg()}")
    print(f"# temp dir: {lab.root}")

    lab.creds = make_creds(lab.root)
    src = lab.root / "src.raw"
    half = [lab.root / "src-a.raw", lab.root / "src-b.raw"]
    make_image(src, size)
    for h in half:
        make_image(h, size // 2)
    tgt = lab.root / "tgt.raw"

    # warm-up (page cache, binaries), not counted
    lab.copy("psk", [(src, tgt)], parallel=False)

    names = list(CONTENDERS)
    res: dict[str, list[Sample]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            s = lab.copy(n, [(src, tgt)], parallel=False)
            res[n].append(s)
            print(f"rep {r + 1} {n:15s} {s.wall:6.2f} s {s.mibps:7.1f} MiB/s "
                  f"cpu client {s.cpu_client:5.2f} s server {s.cpu_server:5.2f} s", flush=True)

    tls = [n for n in names if n != "plain"]
    best = min(tls, key=lambda n: statistics.median(
        x.cpu_client + x.cpu_server for x in res[n]))
    print(f"# cheapest TLS contender (median client+server CPU): {best}")

    two = [(half[0], lab.root / "tgt-a.raw"), (half[1], lab.root / "tgt-b.raw")]
    par: dict[str, list[Sample]] = {"sequential": [], "parallel": []}
    for r in range(reps):
        for mode in (("sequential", "parallel") if r % 2 == 0 else ("parallel", "sequential")):
            s = lab.copy(best, two, parallel=(mode == "parallel"))
            par[mode].append(s)
            print(f"rep {r + 1} 2x{size // 2 // MiB} MiB {mode:10s} {s.wall:6.2f} s "
                  f"{s.mibps:7.1f} MiB/s cpu client {s.cpu_client:5.2f} s "
                  f"server {s.cpu_server:5.2f} s", flush=True)

    print(f"# load average after: {loadavg()}")
    print(f"# total {time.monotonic() - t_start:.0f} s\n")

    # ratios within a repetition (same rep index), then median/min/max
    plain = res["plain"]
    psk = res["psk"]
    hdr = ("| setup | MiB/s | ratio to plain (speed) | ratio to default PSK (speed) "
           "| CPU s/GiB client | CPU s/GiB server | CPU s/GiB total |")
    print(hdr)
    print("|" + "---|" * 7)
    for n in names:
        xs = res[n]
        gib = [x.nbytes / GiB for x in xs]
        print(f"| {n} | {mmm([x.mibps for x in xs], '.0f')} "
              f"| {mmm([x.mibps / p.mibps for x, p in zip(xs, plain, strict=False)], '.2f')} "
              f"| {mmm([x.mibps / p.mibps for x, p in zip(xs, psk, strict=False)], '.2f')} "
              f"| {mmm([x.cpu_client / g for x, g in zip(xs, gib, strict=False)], '.2f')} "
              f"| {mmm([x.cpu_server / g for x, g in zip(xs, gib, strict=False)], '.2f')} "
              f"| {mmm([(x.cpu_client + x.cpu_server) / g for x, g in zip(xs, gib, strict=False)], '.2f')} |")
    print()
    print(f"| {best}, 2 x {size // 2 // MiB} MiB | wall s | MiB/s | speed vs sequential "
          "| CPU s/GiB client | CPU s/GiB server | CPU s/GiB total |")
    print("|" + "---|" * 7)
    for mode in ("sequential", "parallel"):
        xs = par[mode]
        gib = [x.nbytes / GiB for x in xs]
        print(f"| {mode} | {mmm([x.wall for x in xs], '.2f')} "
              f"| {mmm([x.mibps for x in xs], '.0f')} "
              f"| {mmm([x.mibps / q.mibps for x, q in zip(xs, par['sequential'], strict=False)], '.2f')} "
              f"| {mmm([x.cpu_client / g for x, g in zip(xs, gib, strict=False)], '.2f')} "
              f"| {mmm([x.cpu_server / g for x, g in zip(xs, gib, strict=False)], '.2f')} "
              f"| {mmm([(x.cpu_client + x.cpu_server) / g for x, g in zip(xs, gib, strict=False)], '.2f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
