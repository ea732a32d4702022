"""The pure parts of a lab with several managers (issue 15): the address plan, what the lab's state records and
reads back, what the agents are told, and the arguments `Lab.up` refuses before it makes anything. No lab: these
run in `make test-fast` (the lab itself: tests/e2e/test_managers.py)."""

from __future__ import annotations

import tempfile
import tomllib
from pathlib import Path

import pytest

from kvmha.lab import host as hostfs
from kvmha.lab import labdb, net
from kvmha.lab.lab import Lab
from kvmha.lab.state import HostSpec, LabError, LabSpec, ManagerSlot, PidRef


def test_manager_addresses_sit_between_the_bridge_and_the_hosts() -> None:
    subnet = "10.251.0.128/26"
    assert net.bridge_address(subnet) == "10.251.0.129"
    assert [net.manager_address(subnet, k) for k in (1, 8)] == ["10.251.0.130", "10.251.0.137"]
    assert net.host_address(subnet, 1) == "10.251.0.139"  # above every manager slot
    with pytest.raises(net.LabNetError, match=r"1\.\.8"):
        net.manager_address(subnet, 9)
    with pytest.raises(net.LabNetError, match="does not fit"):
        net.manager_address("10.251.0.0/30", 3)


def _spec(tmp_path: Path) -> LabSpec:
    slot = ManagerSlot(name="m1", index=1, netns="kvmhat-m1", veth="kvmhat-m1", address="10.251.0.194",
                       bmc_veth="kvmhat-c1", bmc_address="10.251.1.194")
    return LabSpec(state_dir=str(tmp_path), prefix="kvmhat", subnet="10.251.0.192/26", bridge="kvmhat-br0",
                   bridge_address="10.251.0.193", shared_dir=str(tmp_path / "shared"), manager="10.251.0.194:50051",
                   domain_type="qemu", bmc_user="admin", bmc_password="pw", managers=[slot],
                   agent_managers=["10.251.0.194:50051", "10.251.0.195:50051"],
                   database_url="postgresql://postgres@10.251.0.193:5432/kvmha", database=PidRef(42, 7))


def test_the_state_keeps_managers_and_the_database(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    spec.save()
    loaded = LabSpec.load(tmp_path)
    assert loaded == spec
    assert loaded.manager_slot("m1").bmc_veth == "kvmhat-c1"
    with pytest.raises(KeyError, match="managers: m1"):
        loaded.manager_slot("m9")


def test_agents_are_told_every_manager_in_slot_order(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    host = HostSpec(name="h1", index=1, netns="kvmhat-h1", veth="kvmhat-h1", address="10.251.0.203", bmc_port=623,
                    host_uuid="4f1c7a36-54b4-4e4b-9c55-1f9a4d8b1c11", dir=str(tmp_path / "h1"))
    agent = tomllib.loads(hostfs.agent_toml(spec, host, {}))["agent"]
    assert agent["managers"] == ["10.251.0.194:50051", "10.251.0.195:50051"]
    spec.agent_managers = []  # a lab with one manager in the root namespace
    assert tomllib.loads(hostfs.agent_toml(spec, host, {}))["agent"]["managers"] == ["10.251.0.194:50051"]


def test_the_database_folder_is_one_the_postgres_user_can_reach(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)  # like a pytest tmp dir: postgres could not get in
    spec = _spec(tmp_path)
    outside = labdb._server_dir(spec)
    try:
        assert not outside.is_relative_to(tmp_path) and outside.parent.name.startswith("kvmha-lab-kvmhat-pg-")
        assert labdb._reachable_by_others(outside.parent)
    finally:
        outside.parent.rmdir()
    reachable = Path(tempfile.mkdtemp(prefix="kvmha-test-state-", dir="/tmp"))
    try:
        reachable.chmod(0o755)
        spec.state_dir = str(reachable)
        assert labdb._server_dir(spec) == reachable / "postgres"  # in the state dir itself, nothing made
    finally:
        reachable.rmdir()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"managers": 9}, "between 0 and 8 managers"),
    ({"managers": 2, "stack": "pacemaker"}, "only with the kvmha stack"),
    ({"managers": 2, "manager": "10.0.0.1"}, "no --manager address"),
])
def test_up_refuses_before_making_anything(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    state_dir = tmp_path / "state"
    with pytest.raises(LabError, match=message):
        Lab.up(2, state_dir=state_dir, prefix="kvmhaq", subnet="10.251.2.0/26", **kwargs)  # type: ignore[arg-type]
    assert not state_dir.exists()
