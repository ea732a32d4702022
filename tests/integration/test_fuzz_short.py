"""The short version of bench/fuzz_agentlink.py: 3,000 generated AgentLink messages over mutual TLS against a real
manager, most of them on streams past a valid Hello/Welcome. No crash, no traceback, no message the manager fails to
translate, no leaked session, the honest host Up, every operator call answered (behaviour only: no timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
BENCH = Path(__file__).resolve().parents[2] / "bench" / "fuzz_agentlink.py"


def test_fuzz_short() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--messages", "3000", "--seed", "7", "--no-results"],
                          capture_output=True, text=True, timeout=280)
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert done.returncode == 0, (report, done.stderr[-3000:])
    assert report["messages"] >= 2500 and report["welcomed_share"] >= 0.5, report
    assert not report["manager_crashed"] and report["tracebacks_in_log"] == 0, report
    assert report["stream_failures_in_log"] == 0 and report["leaked_sessions"] == [], report
    assert report["honest_up_at_end"] and report["honest_not_up_samples"] == 0, report
    assert report["operator_calls"] > 0 and report["operator_failures"] == 0, report
