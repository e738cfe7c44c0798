"""Fixtures of the integration tier: real QEMU and qemu-storage-daemon."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.lab import procs
from tests.lab.qemu_vm import QEMU, Disk, PlainVM
from tests.lab.qsd import QSD, StorageDaemon

NEEDS_QEMU = pytest.mark.skipif(
    not (shutil.which(QEMU) and shutil.which(QSD) and shutil.which("qemu-img")),
    reason="qemu-system-x86_64, qemu-storage-daemon and qemu-img are required (make setup installs them)",
)


def make_image(path: str, size: str, fmt: str = "qcow2", backing: str | None = None) -> str:
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if backing:
        argv += ["-b", backing, "-F", "qcow2", "-u"]
    procs.run([*argv, path, size])
    return path


@pytest.fixture
def target(tmp_path) -> Iterator[StorageDaemon]:  # type: ignore[no-untyped-def]
    qsd = StorageDaemon(str(tmp_path), name="target")
    qsd.start()
    yield qsd
    qsd.stop()


@pytest.fixture
def vm_factory(tmp_path):  # type: ignore[no-untyped-def]
    vms: list[PlainVM] = []

    def make(n_disks: int = 1, size: str = "64M", fmt: str = "qcow2", name: str = "vm") -> PlainVM:
        disks = [Disk(make_image(str(tmp_path / f"{name}-disk{i}.{fmt}"), size, fmt), fmt) for i in range(n_disks)]
        vm = PlainVM(str(tmp_path), disks, name=name)
        vm.start()
        vms.append(vm)
        return vm

    yield make
    for vm in vms:
        vm.stop()
