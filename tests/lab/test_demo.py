"""`make demo` (kvmha.lab.demo): its pure parts, and the hook that lets `kvmha-lab down` end the demo's manager.

The demo itself runs a real lab for about 35 s; it is run by hand (`make demo`), not here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kvmha.lab import demo, proc
from kvmha.lab.lab import Lab
from kvmha.lab.state import STATE_FILE, LabSpec, PidRef


def test_busiest_counts_vms_then_ha_vms_then_name() -> None:
    where = {"a": ["h2"], "b": ["h2"], "c": ["h1"], "d": ["h1"], "e": ["h3"]}
    assert demo.busiest(where, ha=["a", "c", "d"]) == "h1"  # two VMs each; h1 has two HA VMs, h2 one
    assert demo.busiest(where) == "h1"  # a full tie: the first name
    assert demo.busiest({"x": ["h3"], "y": ["h3"], "z": ["h1"]}) == "h3"
    with pytest.raises(ValueError):
        demo.busiest({})


@pytest.mark.parametrize(
    ("kind", "message", "label"),
    [
        ("host.status", "Up -> Investigating (missed pings for 7.0 s)", "detected"),
        ("host.status", "Investigating -> Down (BMC says power is off; bmc=off)", "investigated"),
        ("host.status", "Investigating -> Fencing (cannot prove it dead)", "investigated"),
        ("host.status", "Fencing -> Fenced (power off confirmed)", "fenced"),
        ("host.status", "Connecting -> Up (agent connected)", "up"),
        ("work.done", "Done: api runs on h2 (0.3 s after scheduling)", "restarted"),
        ("vm.starting", "starting on h2 (h3 is Down; attempt 1/5)", "starting"),
        ("vm.stopped", "h3 is Down: not HA-enabled, Stopped", "vm"),
        ("work.waiting", "Investigating: waits for a verdict", "ha work"),
        ("fence.skipped", "not fencing: startup.grace", "fence"),
        ("something.new", "whatever", "something.new"),
    ],
)
def test_label_for_names_the_phase(kind: str, message: str, label: str) -> None:
    assert demo.label_for(kind, message).text == label


def test_format_line_is_aligned() -> None:
    line = demo.format_line(7.125, "detected", "h3", "Up -> Investigating")
    assert line == "  +7.12 s  detected      h3       Up -> Investigating"
    assert demo.format_line(-0.5, "x", "y", "z").startswith("  -0.50 s")
    assert demo.subject_name("host:3", {"host:3": "h2"}) == "h2"
    assert demo.subject_name("work:9", {}) == "work:9"


def test_reorder_holds_lines_and_prints_them_in_time_order() -> None:
    lines = demo.Reorder(hold_s=0.5)
    lines.add(7.5, "verified")  # our own look at the hosts, printed as seen
    lines.add(7.2, "restarted")  # the manager's event, streamed a moment later but recorded earlier
    assert lines.due(7.6) == []  # both younger than the hold
    assert lines.due(7.8) == [("restarted", "")]
    lines.add(8.0, "late", "bold")
    assert lines.due(None) == [("verified", ""), ("late", "bold")]
    assert lines.due(None) == []


def test_the_demo_says_where_to_watch(capsys: pytest.CaptureFixture[str]) -> None:
    ready = {"dashboard_url": "https://127.0.0.1:8443/", "dashboard_token": "kvd_abc", "dashboard_cert": "/x.crt"}
    demo.show_dashboard(demo.Out(), ready)
    said = capsys.readouterr().out
    assert "https://127.0.0.1:8443/?token=kvd_abc" in said and "/x.crt" in said
    demo.show_dashboard(demo.Out(), {})  # a lab without a dashboard: nothing to say
    assert capsys.readouterr().out == ""


def test_start_time_and_keeper_log() -> None:
    assert demo.started_at_epoch(250, 1_000.0, 100) == 1_002.5
    assert demo.keeper_log(Path("/run/kvmha-lab")) == Path("/run/kvmha-lab.keeper.log")  # what `down` removes


def test_a_lab_already_up_is_not_replaced_unasked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = LabSpec(state_dir=str(tmp_path), prefix="kvmhaz", subnet="10.251.0.0/24", bridge="kvmhaz-br0",
                   bridge_address="10.251.0.1", shared_dir=str(tmp_path / "shared"), manager=None,
                   domain_type="kvm", bmc_user="admin", bmc_password="x")
    spec.save()
    assert demo.main(["--state-dir", str(tmp_path)]) == 2
    said = capsys.readouterr().out
    assert "needs root" in said or ("already up" in said and "kvmha-lab down" in said and "--replace" in said)
    assert (tmp_path / STATE_FILE).exists()  # untouched


def test_companions_survive_a_save_and_load(tmp_path: Path) -> None:
    spec = LabSpec(state_dir=str(tmp_path), prefix="kvmhaz", subnet="10.251.0.0/24", bridge="kvmhaz-br0",
                   bridge_address="10.251.0.1", shared_dir=str(tmp_path / "shared"), manager=None,
                   domain_type="kvm", bmc_user="admin", bmc_password="x")
    spec.companions["manager"] = PidRef(123, 456)
    spec.save()
    assert LabSpec.load(tmp_path).companions == {"manager": PidRef(123, 456)}
    raw = json.loads((tmp_path / STATE_FILE).read_text())
    del raw["companions"]  # a state file written before companions existed
    (tmp_path / STATE_FILE).write_text(json.dumps(raw))
    assert LabSpec.load(tmp_path).companions == {}


@pytest.mark.lab
def test_down_ends_a_companion_by_pid(tmp_path: Path) -> None:
    """What lets `kvmha-lab down` stop the demo's manager even when the keeper that started it is gone."""
    state = tmp_path / "state"
    state.mkdir()
    spec = LabSpec(state_dir=str(state), prefix="kvmhaz", subnet="10.251.0.0/24", bridge="kvmhaz-br0",
                   bridge_address="10.251.0.1", shared_dir=str(state / "shared"), manager=None,
                   domain_type="kvm", bmc_user="admin", bmc_password="x")
    companion = subprocess.Popen(["sleep", "60"])
    try:
        info = proc.info(companion.pid)
        assert info is not None
        spec.companions["manager"] = PidRef(info.pid, info.start_ticks)
        spec.save()
        Lab.attach(state).down()
        assert companion.wait(5) is not None  # ended (SIGTERM), and reaped here by its parent
        assert not state.exists()
    finally:
        if companion.poll() is None:
            companion.kill()
            companion.wait()
