"""Admin roles and the one table that says which role each admin RPC needs.

Invariants:
- Every RPC of `kvmha.v1.AdminService` has exactly one entry in `RPC_ROLES` (tests/unit/security/test_roles.py
  walks the service descriptor against the table); an RPC missing from the table is refused to everybody, so a
  new RPC is closed until someone decides its role.
- Roles are ordered: admin can do what operator can, operator what reader can.

reader: views (list, show, events, config list). operator: VM and host operations (start/stop, HA on/off,
maintenance). admin: configuration, credentials, VM create/delete, host enrolment, safety overrides.
Other front ends (the web dashboard) reuse these names and this table.
"""

from __future__ import annotations

import enum
from typing import Final

ADMIN_SERVICE: Final = "kvmha.v1.AdminService"
# How a role and a host are written into certificates (URI subject alternative names).
ROLE_URI_PREFIX: Final = "urn:kvmha:role:"
HOST_URI_PREFIX: Final = "urn:kvmha:host:"


class Role(enum.StrEnum):
    READER = "reader"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        """Whether a caller holding this role may make a call that needs `needed`."""
        return self.rank >= needed.rank


_RANK: Final = {Role.READER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}

RPC_ROLES: Final[dict[str, Role]] = {
    # views
    "ListHosts": Role.READER,
    "GetHost": Role.READER,
    "ListVms": Role.READER,
    "GetVm": Role.READER,
    "ListHaWork": Role.READER,
    "PlanFailure": Role.READER,
    "ListEvents": Role.READER,
    "FollowEvents": Role.READER,
    "ListConfig": Role.READER,
    "ListManagers": Role.READER,
    # operations
    "SetMaintenance": Role.OPERATOR,
    "SetHostEnabled": Role.OPERATOR,
    "MigrateVm": Role.OPERATOR,
    "CancelMigration": Role.OPERATOR,
    "StartVm": Role.OPERATOR,
    "StopVm": Role.OPERATOR,
    "SetVmHa": Role.OPERATOR,
    # configuration, credentials, what reaches libvirt as root, safety overrides
    "SetConfig": Role.ADMIN,
    "SetHostBmc": Role.ADMIN,
    "ConfirmHostDown": Role.ADMIN,  # a safety override: lets HA restart VMs of a host nothing else proves dead
    "RemoveHost": Role.ADMIN,  # host enrolment's other end
    "CreateVm": Role.ADMIN,
    "DeleteVm": Role.ADMIN,
    "AddHost": Role.ADMIN,  # host enrolment
}


def required_role(full_method: str) -> Role | None:
    """The role `/kvmha.v1.AdminService/<Rpc>` needs; None for any method not in the table (refused)."""
    service, _, rpc = full_method.lstrip("/").partition("/")
    if service != ADMIN_SERVICE:
        return None
    return RPC_ROLES.get(rpc)


def parse_role(text: str) -> Role:
    try:
        return Role(text.strip().lower())
    except ValueError:
        raise ValueError(f"role {text!r} is not one of {', '.join(r.value for r in Role)}") from None
