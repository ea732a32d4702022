"""The product's layout: fixed top-level entries, every package folder installed, console scripts answer --help."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ALLOWED_TOP = {"proto", "manager", "agent", "deploy", "tests", "Makefile", "pyproject.toml", "README.md", ".ci",
               "bench", "docs", ".gitignore"}


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_top_level_entries_are_the_designed_ones() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    top = {line.split("/")[0] for line in tracked.splitlines() if line}
    assert top, "git lists no files"
    assert top <= ALLOWED_TOP, f"unexpected top-level entries: {sorted(top - ALLOWED_TOP)}"


def test_every_package_folder_is_installed() -> None:
    setuptools = _pyproject()["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools["package-dir"]
    listed = set(setuptools["packages"])
    found = set()
    for package, folder in package_dir.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            found.add(".".join([package, *relative.parts]))
    assert found == listed, f"pyproject [tool.setuptools] packages is out of date: missing {sorted(found - listed)}, " \
                            f"extra {sorted(listed - found)}"


@pytest.mark.parametrize("script", ["kvmha-manager", "kvmha-agent", "kvmha-watchdog", "kvmha", "kvmha-lab"])
def test_console_scripts_print_usage(script: str) -> None:
    executable = Path(sys.executable).parent / script
    assert executable.exists(), f"{script} is not installed in the venv"
    result = subprocess.run([str(executable), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()
