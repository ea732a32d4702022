"""The dashboard in the lab, the demo and the tests: a self-signed certificate, a reader token, the [dashboard]
table of manager.toml, and a small HTTPS client that trusts that certificate.

The certificate is made with `cryptography` (already installed as pyghmi's dependency) for 127.0.0.1 and
localhost, valid for a week: lab use only. Real deployments give [dashboard] cert/key from their PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvmha.manager.dashboard.auth import Role, TokenBook


def self_signed(folder: Path, name: str = "dashboard") -> tuple[Path, Path]:
    """A key and a self-signed certificate for 127.0.0.1/localhost in `folder`: (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvmha lab dashboard")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass(frozen=True)
class LabDashboard:
    """Where a lab manager serves its dashboard and the credential to read it."""

    port: int
    cert: Path
    key: Path
    tokens: Path
    token: str  # a reader token

    @classmethod
    def make(cls, folder: Path, port: int, role: Role = Role.READER) -> LabDashboard:
        cert, key = self_signed(folder)
        tokens = folder / "dashboard-tokens.json"
        _, secret = TokenBook(tokens).issue(role, "lab")
        return cls(port, cert, key, tokens, secret)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    @property
    def login_url(self) -> str:
        return f"{self.url}?token={self.token}"

    def toml(self) -> str:
        return (f'[dashboard]\nlisten = "127.0.0.1:{self.port}"\ncert = "{self.cert}"\nkey = "{self.key}"\n'
                f'tokens = "{self.tokens}"\n')

    def client(self, token: str | None = None) -> DashboardClient:
        return DashboardClient(self.url.rstrip("/"), self.cert, self.token if token is None else token)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class DashboardClient:
    """HTTPS requests to a dashboard, trusting its certificate, never following redirects (tests look at them)."""

    def __init__(self, base: str, cert: Path, token: str = "") -> None:
        self.base, self.token = base, token
        context = ssl.create_default_context(cafile=str(cert))
        self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _NoRedirect())

    def get(self, path: str, headers: dict[str, str] | None = None, auth: bool = True,
            timeout_s: float = 10.0) -> Reply:
        return self.request("GET", path, None, headers, auth, timeout_s)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                auth: bool = True, timeout_s: float = 10.0) -> Reply:
        wanted = dict(headers or {})
        if auth and self.token:
            wanted.setdefault("Authorization", f"Bearer {self.token}")
        request = urllib.request.Request(self.base + path, data=body, headers=wanted, method=method)
        try:
            with self._opener.open(request, timeout=timeout_s) as reply:
                return Reply(reply.status, dict(reply.headers.items()), reply.read())
        except urllib.error.HTTPError as error:
            return Reply(error.code, dict(error.headers.items()), error.read())

    def open_stream(self, path: str, timeout_s: float = 10.0) -> Any:
        """An open response to read Server-Sent Events from line by line (the caller closes it)."""
        request = urllib.request.Request(self.base + path, headers={"Authorization": f"Bearer {self.token}"})
        return self._opener.open(request, timeout=timeout_s)
