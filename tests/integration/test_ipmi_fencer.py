"""IpmiFencer and FencerChain against real BMCs: OpenIPMI's ipmi_sim on 127.0.0.1, whose "power" is a process."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from kvmha.lab.bmc import LOOPBACK, BmcSimulator, find_free_port
from kvmha.manager.adapters.fencer import FenceOutcome, FencerChain, FenceResult, PowerStatus
from kvmha.manager.adapters.ipmi import IpmiFencer
from tests.integration.conftest import BmcFactory, process_alive, start_ticks

USER, PASSWORD = "admin", "s3cr3t-pw"
# Generous against a loaded CI machine; a powered-on ipmi_sim host goes off in about 1 s.
FENCE_TIMEOUT_S = 10.0


def fencer_for(sim: BmcSimulator, password: str = PASSWORD, name: str | None = None) -> IpmiFencer:
    return IpmiFencer(LOOPBACK, sim.config.port, USER, password, name=name)


def host_of(sim: BmcSimulator) -> tuple[int, int]:
    pid = sim.host_pid
    assert pid is not None, "the simulated host should be powered on"
    return pid, start_ticks(pid)


def test_fence_powers_off_a_running_host_and_confirms_it(bmc_factory: BmcFactory) -> None:
    sim = bmc_factory(user=USER, password=PASSWORD)
    host = host_of(sim)
    fencer = fencer_for(sim)
    assert fencer.power_status(5.0) is PowerStatus.ON

    result = fencer.fence(FENCE_TIMEOUT_S)

    assert result.outcome is FenceOutcome.FENCED, result.detail
    assert "confirmed off" in result.detail
    assert result.elapsed_s < FENCE_TIMEOUT_S
    assert not process_alive(*host), "the host process must be gone once the fence says FENCED"
    assert sim.host_pid is None
    assert sim.power() == "off"
    assert fencer.power_status(5.0) is PowerStatus.OFF


def test_fencing_a_host_already_off_is_success_without_a_power_off(bmc_factory: BmcFactory) -> None:
    sim = bmc_factory(user=USER, password=PASSWORD)
    fencer = fencer_for(sim)
    assert fencer.fence(FENCE_TIMEOUT_S).outcome is FenceOutcome.FENCED

    again = fencer.fence(FENCE_TIMEOUT_S)

    assert again.outcome is FenceOutcome.ALREADY_OFF, again.detail
    assert "no power-off sent" in again.detail
    assert again.succeeded


def test_a_host_that_ignores_sigterm_is_confirmed_off_only_after_the_sigkill(
    bmc_factory: BmcFactory, tmp_path: Path
) -> None:
    # ipmi_sim sends SIGTERM on power off, then SIGKILL kill_wait_s later: the fencer must keep polling until the
    # BMC really reports off, not trust the accepted power-off command.
    stubborn = tmp_path / "stubborn.sh"
    stubborn.write_text("#!/bin/sh\ntrap '' TERM\nexec sleep 100000\n")
    stubborn.chmod(0o755)
    sim = bmc_factory(startcmd=str(stubborn), user=USER, password=PASSWORD, kill_wait_s=2)
    host = host_of(sim)

    result = fencer_for(sim).fence(FENCE_TIMEOUT_S)

    assert result.outcome is FenceOutcome.FENCED, result.detail
    assert result.elapsed_s >= 1.5, "confirmed off before ipmi_sim could have sent its SIGKILL"
    assert not process_alive(*host)


def test_a_power_off_not_confirmed_within_the_deadline_is_a_failure(bmc_factory: BmcFactory, tmp_path: Path) -> None:
    stubborn = tmp_path / "stubborn.sh"
    stubborn.write_text("#!/bin/sh\ntrap '' TERM\nexec sleep 100000\n")
    stubborn.chmod(0o755)
    sim = bmc_factory(startcmd=str(stubborn), user=USER, password=PASSWORD, kill_wait_s=5)

    result = fencer_for(sim).fence(1.5)

    assert result.outcome is FenceOutcome.FAILED
    assert "power-off sent but not confirmed off" in result.detail
    # Gave up at its deadline, not at the SIGKILL 5 s later that would have let it confirm (slack for a loaded CI).
    assert result.elapsed_s < 1.5 + 2.5


def test_a_dead_bmc_fails_within_the_timeout_and_its_power_is_unknown(bmc_factory: BmcFactory) -> None:
    sim = bmc_factory(user=USER, password=PASSWORD)
    fencer = fencer_for(sim)
    assert fencer.power_status(5.0) is PowerStatus.ON  # a session existed before the BMC died
    sim.stop()

    started = time.monotonic()
    result = fencer.fence(2.0)
    took_s = time.monotonic() - started

    assert result.outcome is FenceOutcome.FAILED
    assert "did not answer" in result.detail
    assert took_s < 2.0 + 2.0  # pyghmi alone would block about 5 s (new session) or 28 s (old one)
    started = time.monotonic()
    assert fencer.power_status(1.5) is PowerStatus.UNKNOWN
    assert time.monotonic() - started < 1.5 + 2.5


def test_the_fencer_reconnects_after_the_bmc_restarts(bmc_factory: BmcFactory) -> None:
    # In one process pyghmi keeps a broken cached session after a BMC outage and fails every later call at once,
    # even once the BMC is back; the fencer must not inherit that.
    sim = bmc_factory(user=USER, password=PASSWORD)
    fencer = fencer_for(sim)
    assert fencer.power_status(5.0) is PowerStatus.ON
    sim.stop()
    assert fencer.fence(1.5).outcome is FenceOutcome.FAILED

    sim.start()
    result = fencer.fence(FENCE_TIMEOUT_S)

    assert result.outcome is FenceOutcome.FENCED, result.detail


def test_a_wrong_password_fails_clearly_and_never_shows_the_password(bmc_factory: BmcFactory) -> None:
    sim = bmc_factory(user=USER, password=PASSWORD)
    host = host_of(sim)
    wrong = "wr0ng-Passw0rd"
    fencer = fencer_for(sim, password=wrong)

    result = fencer.fence(5.0)

    assert result.outcome is FenceOutcome.FAILED
    assert "login failed" in result.detail and "password" in result.detail.lower()
    assert wrong not in result.detail and wrong not in repr(fencer) and wrong not in repr(result)
    assert fencer.power_status(5.0) is PowerStatus.UNKNOWN
    assert process_alive(*host), "a failed login must not have powered anything off"


def test_the_password_never_reaches_the_logs(bmc_factory: BmcFactory, caplog: pytest.LogCaptureFixture) -> None:
    sim = bmc_factory(user=USER, password=PASSWORD)
    caplog.set_level("DEBUG")
    chain = FencerChain([fencer_for(sim, password="not-" + PASSWORD), fencer_for(sim)])

    assert chain.fence(FENCE_TIMEOUT_S).outcome is FenceOutcome.FENCED
    assert caplog.records, "the fence should have been logged"
    assert PASSWORD not in caplog.text


def test_chain_falls_through_a_dead_bmc_to_the_next_fencer(bmc_factory: BmcFactory) -> None:
    sim = bmc_factory(user=USER, password=PASSWORD)
    host = host_of(sim)
    dead = IpmiFencer(LOOPBACK, find_free_port(), USER, PASSWORD, name="dead-bmc")
    chain = FencerChain([dead, fencer_for(sim, name="live-bmc")])

    # Each fencer gets an equal share of the time left: 4 s for the dead one, the rest for the live one.
    result = chain.fence(8.0)

    assert result.outcome is FenceOutcome.FENCED, result.detail
    assert result.detail.startswith("live-bmc:")
    assert "dead-bmc: " in result.detail and "did not answer" in result.detail
    assert not process_alive(*host)


class CountingFencer:
    """Wraps a real fencer and counts the fences it was asked for."""

    def __init__(self, inner: IpmiFencer) -> None:
        self.inner = inner
        self.name = inner.name
        self.fences = 0
        self._lock = threading.Lock()

    def power_status(self, timeout_s: float) -> PowerStatus:
        return self.inner.power_status(timeout_s)

    def fence(self, timeout_s: float) -> FenceResult:
        with self._lock:
            self.fences += 1
        return self.inner.fence(timeout_s)


def test_two_concurrent_fences_of_one_host_send_one_power_off(bmc_factory: BmcFactory) -> None:
    sim = bmc_factory(user=USER, password=PASSWORD)
    counting = CountingFencer(fencer_for(sim))
    # Two chain objects, as two decisions would build them, guarded by the host's key; the race delay keeps the
    # first fence in flight while the second call arrives.
    chains = [FencerChain([counting], race_delay_s=0.5, guard_key="host-h1") for _ in range(2)]
    results: list[FenceResult] = []
    barrier = threading.Barrier(2)

    def fence(chain: FencerChain) -> None:
        barrier.wait()
        results.append(chain.fence(FENCE_TIMEOUT_S))

    threads = [threading.Thread(target=fence, args=(chain,)) for chain in chains]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * FENCE_TIMEOUT_S)

    assert counting.fences == 1
    assert sorted(r.outcome for r in results) == [FenceOutcome.FENCED, FenceOutcome.FENCED]
    assert sum("joined the fence already in progress" in r.detail for r in results) == 1
    assert sim.power() == "off"
