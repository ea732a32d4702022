"""Fixtures for tests on the namespace lab (real libvirtd, QEMU/KVM, ipmi_sim; root only).

`make_lab()` builds a lab and always tears it down, also when the test fails. Tests use their own names and
subnet (prefix "kvmhat", 10.251.0.192/26) so that a lab brought up by hand (`kvmha-lab up`, 10.251.0.0/24) can stay
up while they run. Modules share one lab where the tests heal what they broke (`heal_all`), and take a fresh one
where a test powers hosts off or checks the machine before and after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kvmha.lab import Lab

TEST_PREFIX = "kvmhat"
TEST_SUBNET = "10.251.0.192/26"
NEEDED_BINARIES = ("ipmi_sim", "ipmitool", "libvirtd", "virtlogd", "virtlockd", "virsh", "qemu-system-x86_64",
                   "qemu-img", "ip", "nsenter", "unshare", "mount")  # fmt: skip


def lab_prerequisites_missing() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root"
    missing = [b for b in NEEDED_BINARIES if shutil.which(b) is None]
    return f"missing binaries: {', '.join(missing)}" if missing else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = lab_prerequisites_missing()
    if reason is None:
        return
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def caps_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One libvirt QEMU capability cache for the whole session: only the first lab pays for the probe."""
    return tmp_path_factory.getbasetemp() / "libvirt-cache"


@contextmanager
def make_lab(tmp_path_factory: pytest.TempPathFactory, hosts: int, **kwargs: Any) -> Iterator[Lab]:
    state_dir = tmp_path_factory.mktemp("lab") / "state"
    kwargs.setdefault("cache_dir", caps_cache(tmp_path_factory))
    lab = Lab.up(hosts, state_dir=state_dir, prefix=TEST_PREFIX, subnet=TEST_SUBNET, **kwargs)
    try:
        yield lab
    finally:
        lab.down()


def heal_all(lab: Lab) -> None:
    for host in lab.hosts:
        if lab.faults(host.name):
            lab.heal(host.name)


def ping(lab: Lab, source: str | None, address: str, tries: int = 1) -> bool:
    """ICMP echo from a host (or from the root namespace when source is None), 1 s deadline per try; True at the
    first answer. Expecting an answer, ask for a few tries: a first ARP exchange on a busy CI machine can be slow."""
    argv = ["ping", "-n", "-c", "1", "-W", "1", address]
    for _ in range(tries):
        if source is None:
            answered = subprocess.run(argv, capture_output=True, check=False).returncode == 0
        else:
            answered = lab.exec(source, argv, check=False).returncode == 0
        if answered:
            return True
    return False


@pytest.fixture(scope="module")
def shared_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Three hosts without agents, shared by a module's tests; each test leaves it healed."""
    with make_lab(tmp_path_factory, 3) as lab:
        yield lab


@pytest.fixture
def lab(shared_lab: Lab) -> Iterator[Lab]:
    yield shared_lab
    heal_all(shared_lab)


@pytest.fixture
def vm_name(request: pytest.FixtureRequest) -> str:
    """A VM name unique to the test (VMs of a shared lab outlive the test that made them)."""
    test_name: str = request.node.name
    return "vm-" + test_name.removeprefix("test_").replace("_", "-")[:40]
