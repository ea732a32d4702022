"""Golden-log scenarios: each folder holds setup.txt, script.txt and log.expect; the run must reproduce the log
exactly and break no invariant. `KVMHA_UPDATE_GOLDEN=1` rewrites the logs (then read every diff before committing).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from kvmha.manager.sim.script import load, run

HERE = Path(__file__).parent
SCENARIOS = sorted(path.parent.name for path in HERE.glob("*/setup.txt"))


def test_there_are_enough_scenarios() -> None:
    assert len(SCENARIOS) >= 15


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario(name: str) -> None:
    folder = HERE / name
    sim = run(load(folder))
    produced = "\n".join(sim.log) + "\n"
    assert sim.checker.violations == [], "fencing invariant broken"
    golden = folder / "log.expect"
    if os.environ.get("KVMHA_UPDATE_GOLDEN") == "1":
        golden.write_text(produced)
        return
    expected = golden.read_text() if golden.exists() else ""
    if produced != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), produced.splitlines(True), "log.expect", "run"))
        pytest.fail(f"scenario {name} diverged from its golden log:\n{diff}")
