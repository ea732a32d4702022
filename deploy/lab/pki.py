"""The lab's PKI: a CA and certificates minted into a state dir, so that the lab, `make demo`, the end-to-end and
integration tests and the benchmarks run the manager, the agents and the CLI with mutual TLS (the product default).

One directory per lab or harness (`<state dir>/pki`, 0700, keys 0600), made by the product's own PKI
(kvmha.manager.security.pki). Minting is idempotent: the CA is made once; a certificate is issued again only when
the existing one does not fit (a manager address or host uuid that changed).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from kvmha.manager.security import pki
from kvmha.manager.security.roles import Role

MANAGER = "manager"
LOOPBACK = ("127.0.0.1", "localhost")
ENV_FILE = "cli.env"  # KEY=VALUE lines the CLI reads through KVMHA_ENV_FILE (or `set -a; . cli.env`)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    def agent_overrides(self) -> dict[str, object]:
        """agent_toml overrides for an agent's [tls] section."""
        return {"tls.ca": str(self.ca), "tls.cert": str(self.cert), "tls.key": str(self.key)}

    def manager_toml(self) -> str:
        return f'[tls]\ncert = "{self.cert}"\nkey = "{self.key}"\nca = "{self.ca}"\n'

    def cli_env(self) -> dict[str, str]:
        return {"KVMHA_TLS_CA": str(self.ca), "KVMHA_TLS_CERT": str(self.cert), "KVMHA_TLS_KEY": str(self.key)}

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes())


class LabPki:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Several lab hosts (or a harness and its lab) may mint at once: one at a time, or two CAs could race."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _ca(self) -> None:
        if not (self.directory / "ca.crt").exists():
            pki.init_ca(self.directory, common_name="kvmha lab CA")

    def files(self, kind: str, name: str) -> TlsFiles:
        cert, key = pki.paths(self.directory, kind, name)
        return TlsFiles(self.directory / "ca.crt", cert, key)

    def manager(self, addresses: list[str] = []) -> TlsFiles:  # noqa: B006 - read only
        """The manager's certificate, valid for loopback and every address in `addresses`."""
        wanted = sorted({*LOOPBACK, *addresses})
        files = self.files("manager", MANAGER)
        with self._locked():
            self._ca()
            if not files.cert.exists() or not set(wanted) <= _sans(files.cert):
                wanted = sorted(set(wanted) | (_sans(files.cert) if files.cert.exists() else set()))
                pki.issue(self.directory, "manager", MANAGER, addresses=wanted)
        return files

    def host(self, name: str, host_uuid: str, address: str = "") -> TlsFiles:
        files = self.files("host", name)
        with self._locked():
            self._ca()
            if (not files.cert.exists() or pki.identity_of(files.cert.read_bytes()).host_uuid != host_uuid.lower()
                    or (address and address not in _sans(files.cert))):
                pki.issue(self.directory, "host", name, host_uuid=host_uuid, addresses=[address] if address else [])
        return files

    def operator(self, role: Role = Role.ADMIN) -> TlsFiles:
        """An operator certificate named after its role (lab-admin, lab-reader, ...)."""
        files = self.files("operator", f"lab-{role.value}")
        with self._locked():
            self._ca()
            if not files.cert.exists():
                pki.issue(self.directory, "operator", f"lab-{role.value}", role=role)
        return files

    def write_cli_env(self, path: Path, admin_address: str, role: Role = Role.ADMIN) -> Path:
        """The CLI's settings for this lab: `KVMHA_ENV_FILE=<path> kvmha host list`."""
        env: Mapping[str, str] = {"KVMHA_MANAGER": admin_address, **self.operator(role).cli_env()}
        path.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
        return path


def _sans(cert: Path) -> set[str]:
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    try:
        names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n.value) for n in names if isinstance(n, x509.IPAddress | x509.DNSName)}
