"""Under the lab's own manager configuration ([domain_xml] allow = ["qemu:override"], what the lab's shared-disk VMs
need), a real manager registers such a VM and refuses one with <qemu:commandline>, naming the element."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvmha.lab.domain import QEMU_NS, BootDisk, domain_xml
from kvmha.lab.harness import LAB_DOMAIN_XML_ALLOW
from kvmha.lab.testing.local import LocalCluster
from kvmha.proto.v1 import admin_pb2 as apb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    running = LocalCluster(tmp_path, f"sqlite:///{tmp_path / 'kvmha.sqlite'}")
    try:
        running.start_manager()
        yield running
    finally:
        running.close()


def test_lab_configuration_allows_override_and_refuses_commandline(cluster: LocalCluster) -> None:
    assert LAB_DOMAIN_XML_ALLOW == ("qemu:override",)
    assert 'allow = [\'qemu:override\']' in cluster.manager_toml()
    shared = domain_xml("shared", disk=BootDisk("/srv/shared/disk.img", shared=True))
    assert "<qemu:override>" in shared
    created = cluster.admin().CreateVm(apb.CreateVmRequest(domain_xml=shared, start=False), timeout=10)
    assert created.name == "shared"
    evil = shared.replace("<qemu:override>", "<qemu:commandline><qemu:arg value='-device'/></qemu:commandline>"
                          "<qemu:override>")
    assert QEMU_NS in evil
    with pytest.raises(grpc.RpcError) as refused:
        cluster.admin().CreateVm(apb.CreateVmRequest(domain_xml=evil.replace("'shared'", "'evil'")
                                                     .replace("<name>shared", "<name>evil"), start=False), timeout=10)
    assert isinstance(refused.value, grpc.Call)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "<qemu:commandline>" in str(refused.value.details())
    assert sorted(cluster.vms()) == ["shared"]
