"""deploy/install.sh as a dry run into a temporary root: what it would install, with which modes, under which user,
and the hardening of both units (systemd-analyze security --offline=true, when systemd-analyze is installed)."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "install.sh"


def install(root: Path, role: str) -> str:
    done = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--dry-run", role], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done
    return done.stdout


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def unit(path: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_manager_dry_run(tmp_path: Path) -> None:
    out = install(tmp_path, "manager")
    assert re.search(r"would run: useradd --system .* kvmha", out) or "would run: useradd" not in out  # user exists
    assert "would run: chown kvmha:kvmha" in out and f"pip install -q {REPO}" in out
    assert mode(tmp_path / "etc/kvmha") == 0o750 and mode(tmp_path / "var/lib/kvmha") == 0o700
    assert mode(tmp_path / "etc/kvmha/manager.toml") == 0o640
    tomllib.loads((tmp_path / "etc/kvmha/manager.toml").read_text())
    service = unit(tmp_path / "etc/systemd/system/kvmha-manager.service")
    assert service["User"] == ["kvmha"] and service["UMask"] == ["0077"] and service["StateDirectoryMode"] == ["0700"]
    assert service["ExecStart"] == ["/opt/kvmha/venv/bin/kvmha-manager --config /etc/kvmha/manager.toml"]
    assert service["CapabilityBoundingSet"] == [""] and service["ProtectSystem"] == ["strict"]
    assert not list(tmp_path.glob("opt/kvmha/venv/bin/*")), "a dry run builds no venv"


def test_agent_dry_run_points_at_what_pip_installs(tmp_path: Path) -> None:
    install(tmp_path, "agent")
    service = unit(tmp_path / "etc/systemd/system/kvmha-agent.service")
    executable = service["ExecStart"][0].split()[0]
    # The console script pip creates from pyproject.toml's [project.scripts] in the venv install.sh makes.
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert executable == "/opt/kvmha/venv/bin/kvmha-agent" and "kvmha-agent" in scripts
    assert (tmp_path / "etc/systemd/system/kvmha-watchdog.service").exists()
    assert mode(tmp_path / "etc/kvmha") == 0o700 and service["UMask"] == ["0077"]
    assert "ProtectKernelTunables" not in service, "isolation reboot-host writes /proc/sysrq-trigger"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize(("name", "at_most"), [("kvmha-manager", 2.0), ("kvmha-agent", 4.0)])
def test_units_are_hardened(name: str, at_most: float) -> None:
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", str(REPO / "deploy/systemd" /
                                                                                f"{name}.service")],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for .*: (\d+\.\d+)", done.stdout + done.stderr)
    assert found is not None, done
    assert float(found[1]) <= at_most, done.stdout[-2000:]
