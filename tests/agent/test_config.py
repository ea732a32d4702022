"""Configuration: the TOML schema the lab writes, environment and flags on top, clear errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kvmha.agent.config import ConfigError, load_config

HOST = "6f1c9d1e-0000-4000-8000-000000000001"
EXAMPLE = f"""
[agent]
host_uuid = "{HOST}"
hostname = "h1"
management_address = "10.251.0.11"
managers = ["10.251.0.1:50051", "10.251.0.2:50051"]
libvirt_uri = "qemu:///system"
storage_paths = ["/srv/kvmha-shared"]
heartbeat_interval_s = 2.0
resync_interval_s = 30.0
neighbor_port = 22
log_format = "kv"
[isolation]
policy = "destroy-vms"
after_s = 45.0
[tls]
ca = "/etc/kvmha/pki/ca.crt"
cert = "/etc/kvmha/pki/host-h1.crt"
key = "/etc/kvmha/pki/host-h1.key"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return str(path)


def test_contract_schema_loads(tmp_path: Path) -> None:
    cfg = load_config(["--config", write(tmp_path, EXAMPLE)], environ={})
    assert cfg.host_uuid == HOST and cfg.hostname == "h1" and cfg.management_address == "10.251.0.11"
    assert cfg.managers == ("10.251.0.1:50051", "10.251.0.2:50051")
    assert cfg.storage_paths == ("/srv/kvmha-shared",)
    assert (cfg.heartbeat_interval_s, cfg.resync_interval_s, cfg.neighbor_port) == (2.0, 30.0, 22)
    assert (cfg.isolation_policy, cfg.isolation_after_s) == ("destroy-vms", 45.0)


def test_env_then_flags_override_the_file(tmp_path: Path) -> None:
    env = {"KVMHA_AGENT_MANAGERS": "127.0.0.1:1,127.0.0.1:2", "KVMHA_AGENT_ISOLATION_POLICY": "none",
           "KVMHA_AGENT_LIBVIRT_URI": "test:///default"}
    cfg = load_config(["--config", write(tmp_path, EXAMPLE), "--libvirt-uri", "qemu+tcp://x/system"], environ=env)
    assert cfg.managers == ("127.0.0.1:1", "127.0.0.1:2")
    assert cfg.isolation_policy == "none"
    assert cfg.libvirt_uri == "qemu+tcp://x/system"


def test_the_deploy_example_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "config" / "agent.toml"
    cfg = load_config(["--config", str(example)], environ={})
    assert cfg.isolation_policy == "destroy-vms"  # matches the manager's default isolation.self.fence = true


@pytest.mark.parametrize(("text", "message"), [
    ("[agent]\nhostname = 'x'\n", "host_uuid is required"),
    ("[agent]\nhost_uuid = 'nope'\n", "not a UUID"),
    (f"[agent]\nhost_uuid = '{HOST}'\nmanagers = ['nohost']\n", "needs a port"),
    (f"[agent]\nhost_uuid = '{HOST}'\nheartbeat_interval_s = -1\n", "heartbeat_interval_s"),
    (f"[agent]\nhost_uuid = '{HOST}'\nbogus = 1\n", "unknown key 'bogus'"),
    (f"[agent]\nhost_uuid = '{HOST}'\n[isolation]\npolicy = 'shoot'\n", "isolation policy"),
    (f"[agent]\nhost_uuid = '{HOST}'\nstorage_paths = ['relative']\n", "must be absolute"),
    ("[agent\n", "not valid TOML"),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", write(tmp_path, text)], environ={})


def test_cli_help_and_config_error_exit_codes(tmp_path: Path) -> None:
    helped = subprocess.run([".venv/bin/kvmha-agent", "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and "--manager" in helped.stdout and "--libvirt-uri" in helped.stdout
    bad = subprocess.run([".venv/bin/kvmha-agent", "--config", write(tmp_path, "[agent]\n")], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "host_uuid is required" in bad.stderr


def test_mutual_tls_is_the_default(tmp_path: Path) -> None:
    """Without [tls] the agent refuses to start unless plaintext is explicitly allowed; half a [tls] is refused."""
    plain = EXAMPLE.split("[tls]")[0]
    with pytest.raises(ConfigError, match="mutual TLS is the default"):
        load_config(["--config", write(tmp_path, plain)], environ={})
    allowed = load_config(["--config", write(tmp_path, plain + "[tls]\nallow_insecure_plaintext = true\n")],
                          environ={})
    assert allowed.allow_insecure_plaintext and not allowed.tls_ca
    with pytest.raises(ConfigError, match="ca, cert and key"):
        load_config(["--config", write(tmp_path, plain + '[tls]\nca = "/x/ca.crt"\n')], environ={})
    cfg = load_config(["--config", write(tmp_path, EXAMPLE)], environ={})
    assert (cfg.tls_ca, cfg.tls_key) == ("/etc/kvmha/pki/ca.crt", "/etc/kvmha/pki/host-h1.key")
