"""Every external program virtsync, its lab, its benchmarks and its scripts execute, with the
Debian 12 package that provides it.

One list, so that a new ``subprocess`` call cannot bring a program the set-up never
installs (issue 12: the lab ran ``nft`` and ``nftables`` was not in ``scripts/setup.sh``).
``tests/unit/test_programs.py`` scans the code for executed programs and checks each
against this list, and each package against what the set-up installs: ``PACKAGES`` of
``scripts/setup.sh`` (with their dependencies), ``bench/setup.sh`` for the benchmarks'
own tools, or Debian's ``Priority: required`` base that every installation has.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROGRAMS", "Program", "package_of"]

AGENT, LAB, BENCH, SETUP = "agent", "lab", "bench", "setup"


@dataclass(frozen=True, slots=True)
class Program:
    """:param package: the Debian package whose files hold the program
    :param used_by: ``agent`` (the product), ``lab`` (tests), ``bench`` or ``setup`` (scripts)"""

    package: str
    used_by: str


def _coreutils(*names: str) -> dict[str, Program]:
    return {name: Program("coreutils", SETUP) for name in names}


PROGRAMS: dict[str, Program] = {
    # the agent
    "qemu-img": Program("qemu-utils", AGENT),
    "qemu-nbd": Program("qemu-utils", LAB),
    "qemu-storage-daemon": Program("qemu-system-common", AGENT),
    "openssl": Program("openssl", AGENT),
    # the lab: hosts in namespaces, guests, network faults
    "qemu-system-x86_64": Program("qemu-system-x86", LAB),
    "qemu-io": Program("qemu-utils", LAB),
    "libvirtd": Program("libvirt-daemon", LAB),
    "virtlogd": Program("libvirt-daemon", LAB),
    "virsh": Program("libvirt-clients", LAB),
    "ip": Program("iproute2", LAB),
    "ss": Program("iproute2", LAB),
    "nft": Program("nftables", LAB),
    "busybox": Program("busybox-static", LAB),
    "nsenter": Program("util-linux", LAB),
    "unshare": Program("util-linux", LAB),
    "mount": Program("mount", LAB),
    "umount": Program("mount", LAB),
    # the benchmarks
    "virtnbdbackup": Program("virtnbdbackup", BENCH),
    "certtool": Program("gnutls-bin", BENCH),
    "psktool": Program("gnutls-bin", BENCH),
    "git": Program("git", BENCH),
    # the scripts (set-up, guest build)
    "sh": Program("dash", SETUP),
    "bash": Program("bash", SETUP),
    "python3": Program("python3-minimal", SETUP),
    "apt-get": Program("apt", SETUP),
    "apt-cache": Program("apt", SETUP),
    "dpkg": Program("dpkg", SETUP),
    "dpkg-query": Program("dpkg", SETUP),
    "awk": Program("mawk", SETUP),
    "grep": Program("grep", SETUP),
    "sed": Program("sed", SETUP),
    "find": Program("findutils", SETUP),
    "gzip": Program("gzip", SETUP),
    "xz": Program("xz-utils", SETUP),
    "zstd": Program("zstd", SETUP),
    "flock": Program("util-linux", SETUP),
    **_coreutils("cat", "chmod", "cp", "cut", "dirname", "head", "ln", "ls", "mkdir", "mktemp", "mv", "od", "pwd",
            "rm", "sha256sum", "sort", "tail", "touch", "tr"),
}


def package_of(program: str) -> str:
    """The Debian package to install for ``program`` (for "not found" messages).

    :raise KeyError: ``program`` is not in :data:`PROGRAMS`
    """
    return PROGRAMS[program].package
