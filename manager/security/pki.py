"""kvmha's small PKI (`kvmha pki ...`): one CA, and certificates for managers, hosts and operators.

Layout of a PKI directory (0700; every key 0600, written before anything else can read it):

    ca.crt ca.key                         the CA (keep ca.key offline once the certificates are issued)
    manager-NAME.crt manager-NAME.key     a manager: its addresses as IP/DNS SANs (server and client use)
    host-NAME.crt host-NAME.key           a host: urn:kvmha:host:<uuid> plus its management address
    operator-NAME.crt operator-NAME.key   an operator: urn:kvmha:role:<reader|operator|admin>

The identity a peer proves is read from its certificate's URI SANs only (never from its common name), so a
certificate without the host URI can never be a host, and one without a role URI is never an operator.
Keys are ECDSA P-256: small, fast handshakes, supported by gRPC's BoringSSL.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import uuid as uuid_module
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvmha.manager.security.roles import HOST_URI_PREFIX, ROLE_URI_PREFIX, Role

CA_DAYS = 3650
LEAF_DAYS = 825
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
KINDS = ("manager", "host", "operator")


class PkiError(ValueError):
    """A PKI request that cannot be done; the message says why."""


@dataclass(frozen=True)
class Identity:
    """What a certificate proves about its holder."""

    common_name: str
    host_uuid: str | None  # canonical spelling
    role: Role | None
    not_after: datetime.datetime

    @property
    def kind(self) -> str:
        return "host" if self.host_uuid else "operator" if self.role else "other"


@lru_cache(maxsize=4096)
def identity_of(pem: bytes) -> Identity:
    """The identity in a PEM certificate (one the TLS layer already verified against the CA)."""
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    host_uuid, role = None, None
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    for uri in uris:
        if uri.startswith(HOST_URI_PREFIX):
            try:
                host_uuid = str(uuid_module.UUID(uri[len(HOST_URI_PREFIX):]))
            except ValueError:
                host_uuid = None
        elif uri.startswith(ROLE_URI_PREFIX):
            try:
                role = Role(uri[len(ROLE_URI_PREFIX):])
            except ValueError:
                role = None
    return Identity(common_name, host_uuid, role, cert.not_valid_after_utc)


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise PkiError(f"name {name!r}: use letters, digits, '.', '_' or '-' (at most 63)")
    return name


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to a 0600 file (created with that mode: it is never readable by others, not even briefly)."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _private_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)
    return directory


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def init_ca(directory: Path, common_name: str = "kvmha CA", days: int = CA_DAYS, force: bool = False) -> Path:
    """Create the CA in `directory`; refuses to replace an existing one unless `force` (that orphans every
    certificate it signed)."""
    _private_dir(directory)
    cert_path = directory / "ca.crt"
    if cert_path.exists() and not force:
        raise PkiError(f"{cert_path} exists: a new CA would orphan every certificate it signed (use --force)")
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    write_private(directory / "ca.key", _pem_key(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as error:
        raise PkiError(f"no CA in {directory} ({error.filename} missing): run `kvmha pki init` first") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{directory / 'ca.key'} is not an EC key made by `kvmha pki init`")
    return cert, key


def _address_names(addresses: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for address in addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            if not re.match(r"^[A-Za-z0-9*][A-Za-z0-9.-]{0,252}$", address):
                raise PkiError(f"address {address!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(address))
    return names


def issue(directory: Path, kind: str, name: str, *, addresses: list[str] | None = None, host_uuid: str = "",
          role: Role | None = None, days: int = LEAF_DAYS) -> Path:
    """Issue `<kind>-<name>.crt/.key` signed by the CA in `directory`; returns the certificate's path."""
    if kind not in KINDS:
        raise PkiError(f"kind {kind!r} is not one of {KINDS}")
    _check_name(name)
    sans: list[x509.GeneralName] = _address_names(addresses or [])
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if kind == "manager":
        if not sans:
            raise PkiError("a manager certificate needs at least one --address (what agents and the CLI dial)")
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    elif kind == "host":
        try:
            host_uuid = str(uuid_module.UUID(host_uuid))
        except ValueError:
            raise PkiError(f"--uuid {host_uuid!r} is not a UUID") from None
        sans.insert(0, x509.UniformResourceIdentifier(HOST_URI_PREFIX + host_uuid))
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)  # hosts may speak TLS to each other later (migration)
    else:
        if role is None:
            raise PkiError("an operator certificate needs a --role")
        sans.insert(0, x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role.value))
    ca_cert, ca_key = _load_ca(directory)
    key = _key()
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(_now() - datetime.timedelta(minutes=5))
               .not_valid_after(min(_now() + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = paths(directory, kind, name)
    write_private(key_path, _pem_key(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def paths(directory: Path, kind: str, name: str) -> tuple[Path, Path]:
    """(certificate, key) of `kind` `name` in a PKI directory."""
    return directory / f"{kind}-{name}.crt", directory / f"{kind}-{name}.key"


def describe(cert_path: Path) -> list[tuple[str, str]]:
    """What `kvmha pki show` prints: subject, issuer, validity, SANs, the identity it proves."""
    pem = cert_path.read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    ident = identity_of(pem)
    try:
        sans = [str(v.value) for v in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
    except x509.ExtensionNotFound:
        sans = []
    rows = [("subject", cert.subject.rfc4514_string()), ("issuer", cert.issuer.rfc4514_string()),
            ("serial", format(cert.serial_number, "x")),
            ("not_before", cert.not_valid_before_utc.isoformat()), ("not_after", cert.not_valid_after_utc.isoformat()),
            ("sans", ", ".join(sans) or "-"), ("proves", ident.kind)]
    if ident.host_uuid:
        rows.append(("host_uuid", ident.host_uuid))
    if ident.role:
        rows.append(("role", ident.role.value))
    return rows
