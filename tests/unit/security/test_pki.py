"""The PKI: what each certificate proves, file modes, and the mistakes it refuses."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from kvmha.manager.security import pki
from kvmha.manager.security.roles import Role

UUID = "7F0E2C52-6F7C-4D2B-9F55-1C1B6FE1A0A1"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_manager_host_operator(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    ca = pki.init_ca(directory)
    assert mode(directory) == 0o700 and mode(directory / "ca.key") == 0o600
    manager = pki.issue(directory, "manager", "mgr1", addresses=["10.0.0.5", "mgr1.example"])
    host = pki.issue(directory, "host", "kvm1", host_uuid=UUID, addresses=["10.0.0.11"])
    admin = pki.issue(directory, "operator", "alice", role=Role.ADMIN)
    for cert in (manager, host, admin):
        assert mode(cert.with_suffix(".key")) == 0o600
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
        parsed.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.read_bytes()))
    host_id = pki.identity_of(host.read_bytes())
    assert (host_id.kind, host_id.host_uuid, host_id.role) == ("host", UUID.lower(), None)
    assert pki.identity_of(admin.read_bytes()).role is Role.ADMIN
    manager_id = pki.identity_of(manager.read_bytes())
    assert (manager_id.kind, manager_id.host_uuid, manager_id.role) == ("other", None, None)
    shown = dict(pki.describe(host))
    assert shown["host_uuid"] == UUID.lower() and "10.0.0.11" in shown["sans"]
    assert "urn:kvmha:host:" + UUID.lower() in shown["sans"]


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="kvmha pki init"):
        pki.issue(tmp_path, "operator", "bob", role=Role.READER)
    pki.init_ca(tmp_path)
    with pytest.raises(pki.PkiError, match="orphan"):
        pki.init_ca(tmp_path)
    with pytest.raises(pki.PkiError, match="not a UUID"):
        pki.issue(tmp_path, "host", "kvm1", host_uuid="kvm1")
    with pytest.raises(pki.PkiError, match="--address"):
        pki.issue(tmp_path, "manager", "mgr1")
    with pytest.raises(pki.PkiError, match="--role"):
        pki.issue(tmp_path, "operator", "bob")
    with pytest.raises(pki.PkiError, match="name"):
        pki.issue(tmp_path, "operator", "../bob", role=Role.READER)
    with pytest.raises(pki.PkiError, match="neither"):
        pki.issue(tmp_path, "manager", "mgr1", addresses=["bad name"])


def test_a_common_name_proves_nothing(tmp_path: Path) -> None:
    """Only the URI SANs carry identity: an operator named like a host uuid is not that host."""
    pki.init_ca(tmp_path)
    cert = pki.issue(tmp_path, "operator", UUID.lower(), role=Role.READER)
    assert pki.identity_of(cert.read_bytes()).host_uuid is None
