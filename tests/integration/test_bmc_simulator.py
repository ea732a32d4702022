"""The lab's BMC simulator (kvmha.lab.bmc): power semantics of ipmi_sim and clean start/stop by PID."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from kvmha.lab.bmc import BmcConfig, BmcError, BmcSimulator, asf_ping, find_free_port
from tests.integration.conftest import BmcFactory, process_alive, start_ticks


def wait_power(sim: BmcSimulator, state: str, timeout_s: float = 8.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sim.power() != state:
        assert time.monotonic() < deadline, f"{sim} did not reach power {state}"
        time.sleep(0.1)


def test_power_on_after_off_relaunches_the_host_with_a_new_pid(bmc_factory: BmcFactory) -> None:
    sim = bmc_factory()
    first = sim.host_pid
    assert first is not None and sim.power() == "on"
    first_ticks = start_ticks(first)

    sim.chassis_power("off")
    wait_power(sim, "off")
    assert not process_alive(first, first_ticks)
    assert sim.host_pid is None

    sim.chassis_power("on")
    wait_power(sim, "on")
    second = sim.host_pid
    assert second is not None and second != first

    sim.chassis_power("on")  # on while on: no second host
    assert sim.host_pid == second


def test_start_now_false_waits_for_a_power_on(bmc_factory: BmcFactory) -> None:
    sim = bmc_factory(start_now=False)
    assert sim.power() == "off" and sim.host_pid is None
    sim.chassis_power("on")
    wait_power(sim, "on")
    assert sim.host_pid is not None


def test_stop_ends_ipmi_sim_and_its_host_and_is_idempotent(bmc_factory: BmcFactory) -> None:
    sim = bmc_factory()
    bmc_pid, host_pid = sim.pid, sim.host_pid
    assert bmc_pid is not None and host_pid is not None
    bmc, host = (bmc_pid, start_ticks(bmc_pid)), (host_pid, start_ticks(host_pid))

    sim.stop()
    sim.stop()

    assert sim.pid is None
    assert not process_alive(*bmc) and not process_alive(*host)
    assert not asf_ping(sim.config.port, timeout_s=0.3)


def test_a_bmc_can_die_with_its_host_left_running(bmc_factory: BmcFactory) -> None:
    sim = bmc_factory()
    host_pid = sim.host_pid
    assert host_pid is not None
    host = (host_pid, start_ticks(host_pid))

    sim.stop(leave_host_running=True)
    assert sim.pid is None and process_alive(*host)

    sim.kill_host()
    assert not process_alive(*host)


def test_simulators_are_independent(bmc_factory: BmcFactory) -> None:
    one, two = bmc_factory(), bmc_factory()
    assert one.config.port != two.config.port
    one.chassis_power("off")
    wait_power(one, "off")
    assert two.power() == "on"
    # Each keeps its persistent state in its own directory.
    assert (one.config.workdir / "state" / "ipmi_sim" / "bmc1").is_dir()
    assert (two.config.workdir / "state" / "ipmi_sim" / "bmc2").is_dir()


def test_a_port_in_use_is_a_clear_start_error(bmc_factory: BmcFactory, tmp_path: Path) -> None:
    taken = bmc_factory()
    clash = BmcSimulator(
        BmcConfig(name="clash", port=taken.config.port, workdir=tmp_path / "clash", startcmd="sleep 100000")
    )
    with pytest.raises(BmcError, match="clash"):
        clash.start()
    assert clash.pid is None


@pytest.mark.parametrize(
    "change",
    [{"name": "a b"}, {"startcmd": 'echo "x"'}, {"password": "has space"}, {"poweroff_wait_s": 0}, {"port": 0}],
)
def test_config_that_would_break_lan_conf_is_refused(change: dict[str, Any], tmp_path: Path) -> None:
    fields: dict[str, Any] = {"name": "ok", "port": find_free_port(), "workdir": tmp_path, "startcmd": "sleep 1"}
    fields.update(change)
    with pytest.raises(ValueError):
        BmcSimulator(BmcConfig(**fields))


def test_the_password_is_not_in_the_config_repr(tmp_path: Path) -> None:
    config = BmcConfig(name="x", port=1623, workdir=tmp_path, startcmd="sleep 1", password="hidden-pw")
    assert "hidden-pw" not in repr(config) and "hidden-pw" not in repr(BmcSimulator(config))
