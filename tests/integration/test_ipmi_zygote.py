"""The IPMI zygote behind IpmiFencer: one long-lived process with pyghmi imported, one forked child per operation;
restarted when it dies, stopped cleanly. Against OpenIPMI's ipmi_sim on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from kvmha.lab.bmc import LOOPBACK, find_free_port
from kvmha.manager.adapters.fencer import FenceOutcome, PowerStatus
from kvmha.manager.adapters.ipmi import IpmiFencer
from kvmha.manager.adapters.ipmi_zygote import IpmiZygote
from tests.integration.conftest import BmcFactory

USER, PASSWORD = "admin", "s3cr3t-pw"


@pytest.fixture
def zygote() -> Iterator[IpmiZygote]:
    handle = IpmiZygote()
    try:
        yield handle
    finally:
        handle.close()


def wait_for_pid(zygote: IpmiZygote) -> int:
    zygote.start()
    pid = zygote.pid
    assert pid is not None
    return pid


def test_one_zygote_serves_every_call_and_each_sees_the_bmc_afresh(
    bmc_factory: BmcFactory, zygote: IpmiZygote
) -> None:
    sim = bmc_factory(user=USER, password=PASSWORD)
    fencer = IpmiFencer(LOOPBACK, sim.config.port, USER, PASSWORD, zygote=zygote)

    answers = [fencer.power_status(5.0) for _ in range(5)]
    sim.stop()  # a session cached in a long-lived process would now be broken for good
    dead = fencer.power_status(1.5)
    sim.start()
    back = fencer.fence(10.0)

    assert answers == [PowerStatus.ON] * 5
    assert dead is PowerStatus.UNKNOWN
    assert back.outcome is FenceOutcome.FENCED, back.detail
    assert zygote.starts == 1


def test_concurrent_calls_run_side_by_side(bmc_factory: BmcFactory, zygote: IpmiZygote) -> None:
    sims = [bmc_factory(user=USER, password=PASSWORD) for _ in range(2)]
    fencers = [IpmiFencer(LOOPBACK, sim.config.port, USER, PASSWORD, zygote=zygote) for sim in sims]
    dead = IpmiFencer(LOOPBACK, find_free_port(), USER, PASSWORD, zygote=zygote)
    results: dict[str, PowerStatus] = {}

    def ask(name: str, fencer: IpmiFencer, timeout_s: float) -> None:
        results[name] = fencer.power_status(timeout_s)

    threads = [threading.Thread(target=ask, args=("dead", dead, 3.0))]
    threads += [threading.Thread(target=ask, args=(f"bmc{n}", f, 5.0)) for n, f in enumerate(fencers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10.0)

    # The live BMCs answer although a call to a dead one is blocked in its own child meanwhile.
    assert results == {"dead": PowerStatus.UNKNOWN, "bmc0": PowerStatus.ON, "bmc1": PowerStatus.ON}
    assert zygote.starts == 1


def test_a_zygote_that_dies_fails_the_call_in_flight_and_is_started_again(
    bmc_factory: BmcFactory, zygote: IpmiZygote
) -> None:
    sim = bmc_factory(user=USER, password=PASSWORD)
    dead = IpmiFencer(LOOPBACK, find_free_port(), USER, PASSWORD, zygote=zygote)
    live = IpmiFencer(LOOPBACK, sim.config.port, USER, PASSWORD, zygote=zygote)
    first_pid = wait_for_pid(zygote)
    timer = threading.Timer(0.5, os.kill, (first_pid, signal.SIGKILL))  # the zygote is our own child
    timer.start()

    in_flight = dead.fence(8.0)  # blocked on a BMC that never answers when its zygote is killed
    timer.join()
    after = live.power_status(5.0)

    assert in_flight.outcome is FenceOutcome.FAILED
    assert "IPMI worker exited" in in_flight.detail, in_flight.detail
    assert after is PowerStatus.ON
    assert zygote.starts == 2
    assert zygote.pid not in (None, first_pid)


def test_close_stops_the_zygote_and_refuses_later_calls(bmc_factory: BmcFactory) -> None:
    sim = bmc_factory(user=USER, password=PASSWORD)
    zygote = IpmiZygote()
    fencer = IpmiFencer(LOOPBACK, sim.config.port, USER, PASSWORD, zygote=zygote)
    assert fencer.power_status(5.0) is PowerStatus.ON
    pid = zygote.pid
    assert pid is not None

    zygote.close()

    with pytest.raises(ProcessLookupError):  # exited and reaped
        os.kill(pid, 0)
    refused = fencer.fence(2.0)
    assert refused.outcome is FenceOutcome.FAILED
    assert "shut down" in refused.detail
    assert fencer.power_status(2.0) is PowerStatus.UNKNOWN


def test_close_ends_a_call_in_flight_without_waiting_for_the_bmc(zygote: IpmiZygote) -> None:
    dead = IpmiFencer(LOOPBACK, find_free_port(), USER, PASSWORD, zygote=zygote)
    wait_for_pid(zygote)
    results: list[PowerStatus] = []
    caller = threading.Thread(target=lambda: results.append(dead.power_status(20.0)))
    caller.start()
    time.sleep(0.3)  # let the call reach its child

    zygote.close()
    caller.join(10.0)

    assert not caller.is_alive(), "a call must not outlive the zygote's shutdown"
    assert results == [PowerStatus.UNKNOWN]
