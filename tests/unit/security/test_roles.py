"""The admin roles table, walked against the AdminService descriptor and against every role."""

from __future__ import annotations

import datetime

import grpc
import pytest

from kvmha.manager.security.auth import Denied, authorize
from kvmha.manager.security.pki import Identity
from kvmha.manager.security.roles import ADMIN_SERVICE, RPC_ROLES, Role, parse_role, required_role
from kvmha.proto.v1 import admin_pb2

SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
FAR = datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC)


def operator(role: Role | None, name: str = "alice") -> Identity:
    return Identity(name, None, role, FAR)


def test_every_admin_rpc_has_exactly_one_role_and_the_table_names_no_other() -> None:
    rpcs = {method.name for method in SERVICE.methods}
    assert SERVICE.full_name == ADMIN_SERVICE
    assert set(RPC_ROLES) == rpcs, "add the new RPC to kvmha.manager.security.roles.RPC_ROLES"


@pytest.mark.parametrize("rpc", sorted(RPC_ROLES))
@pytest.mark.parametrize("held", list(Role))
def test_walk_the_table_for_every_role(rpc: str, held: Role) -> None:
    method = f"/{ADMIN_SERVICE}/{rpc}"
    needed = RPC_ROLES[rpc]
    if held.rank >= needed.rank:
        assert authorize(method, operator(held), None) is held
    else:
        with pytest.raises(Denied) as denied:
            authorize(method, operator(held), None)
        assert denied.value.status is grpc.StatusCode.PERMISSION_DENIED
        assert needed.value in str(denied.value) and rpc in str(denied.value)


def test_the_issue_s_examples() -> None:
    # reader: views; operator: VM and host operations; admin: configuration, BMC, create/delete.
    assert required_role(f"/{ADMIN_SERVICE}/ListEvents") is Role.READER
    assert required_role(f"/{ADMIN_SERVICE}/SetMaintenance") is Role.OPERATOR
    for rpc in ("SetConfig", "SetHostBmc", "CreateVm", "DeleteVm", "ConfirmHostDown"):
        assert required_role(f"/{ADMIN_SERVICE}/{rpc}") is Role.ADMIN


@pytest.mark.parametrize("method", ["/kvmha.v1.AdminService/NoSuchRpc", "/kvmha.v1.AgentLink/Connect",
                                    "/grpc.health.v1.Health/Check", ""])
def test_methods_outside_the_table_are_refused_even_to_admins(method: str) -> None:
    assert required_role(method) is None
    with pytest.raises(Denied) as denied:
        authorize(method, operator(Role.ADMIN), Role.ADMIN)
    assert denied.value.status is grpc.StatusCode.PERMISSION_DENIED


def test_no_certificate_or_a_certificate_without_a_role_is_unauthenticated() -> None:
    host_certificate = Identity("kvm1", "7f0e2c52-6f7c-4d2b-9f55-1c1b6fe1a0a1", None, FAR)
    for identity in (None, host_certificate):
        with pytest.raises(Denied) as denied:
            authorize(f"/{ADMIN_SERVICE}/ListHosts", identity, None)
        assert denied.value.status is grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_callers_get_the_configured_role_only_without_a_certificate() -> None:
    assert authorize(f"/{ADMIN_SERVICE}/SetConfig", None, Role.ADMIN) is Role.ADMIN
    with pytest.raises(Denied):
        authorize(f"/{ADMIN_SERVICE}/SetConfig", operator(Role.READER), Role.ADMIN)


def test_roles_are_ordered_and_parsed() -> None:
    assert Role.ADMIN.allows(Role.OPERATOR) and Role.OPERATOR.allows(Role.READER)
    assert not Role.READER.allows(Role.OPERATOR) and not Role.OPERATOR.allows(Role.ADMIN)
    assert parse_role(" Admin ") is Role.ADMIN
    with pytest.raises(ValueError, match="reader, operator, admin"):
        parse_role("root")
