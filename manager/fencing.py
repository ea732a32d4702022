"""Glue between the core's Fence/QueryBmc actions and the fencer adapters (IPMI through pyghmi).

Runs in a worker thread (pyghmi blocks). One FencerChain per host is kept so that its race guard sees every fence
of that host; a host without a BMC cannot be fenced (the core then waits out the agent's isolation response).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

from kvmha.manager.adapters.fencer import FenceOutcome, FencerChain, PowerStatus, race_delay_s
from kvmha.manager.adapters.ipmi import IpmiFencer
from kvmha.manager.core import actions, facts
from kvmha.manager.store import BmcCredentials

log = logging.getLogger(__name__)

FencerFactory = Callable[[BmcCredentials], FencerChain]

# Two managers (or a manager and an operator's script) deciding to fence the same host at the same moment must not
# fire together: each manager waits a delay in [0, FENCE_RACE_DELAY_MAX_S) fixed by its id and the BMC, so the
# second one finds the host already off ("already off" is success). Small: it is added to every failover.
FENCE_RACE_DELAY_MAX_S = 1.0


def ipmi_factory(manager_id: str, race_delay_max_s: float = FENCE_RACE_DELAY_MAX_S) -> FencerFactory:
    """The default factory: one IPMI fencer per BMC, its chain cached so concurrent fences of a host share one
    in-process guard."""
    chains: dict[BmcCredentials, FencerChain] = {}
    lock = threading.Lock()

    def chain_for(credentials: BmcCredentials) -> FencerChain:
        with lock:
            chain = chains.get(credentials)
            if chain is None:
                bmc = f"{credentials.address}:{credentials.port}"
                fencer = IpmiFencer(credentials.address, credentials.port, credentials.user, credentials.password)
                delay_s = race_delay_s(f"{manager_id}/{bmc}", race_delay_max_s)
                chain = chains[credentials] = FencerChain([fencer], race_delay_s=delay_s, guard_key=bmc)
            return chain

    return chain_for


def fence_host(factory: FencerFactory, credentials: BmcCredentials | None, action: actions.Fence,
               timeout_s: float) -> facts.FenceCompleted:
    if credentials is None:
        return facts.FenceCompleted(request_id=action.request_id, host_id=action.host_id, ok=False,
                                    already_off=False, detail="no BMC configured for this host")
    try:
        result = factory(credentials).fence(timeout_s)
    except Exception as error:  # an adapter bug must read as a failed fence, never as a success
        # The type only: an exception's text could carry what the adapter was given, secrets included.
        return facts.FenceCompleted(request_id=action.request_id, host_id=action.host_id, ok=False,
                                    already_off=False, detail=f"fencer error: {type(error).__name__}")
    ok = result.outcome in (FenceOutcome.FENCED, FenceOutcome.ALREADY_OFF)
    return facts.FenceCompleted(request_id=action.request_id, host_id=action.host_id, ok=ok,
                                already_off=result.outcome is FenceOutcome.ALREADY_OFF, detail=result.detail)


def query_bmc(factory: FencerFactory, credentials: BmcCredentials | None, action: actions.QueryBmc,
              timeout_s: float) -> facts.BmcPowerReported:
    if credentials is None:
        return facts.BmcPowerReported(request_id=action.request_id, host_id=action.host_id, power="unknown",
                                      detail="no BMC configured for this host")
    started = time.monotonic()
    try:
        status = factory(credentials).power_status(timeout_s)
    except Exception as error:
        return facts.BmcPowerReported(request_id=action.request_id, host_id=action.host_id, power="unknown",
                                      detail=f"fencer error: {type(error).__name__}")
    power: Literal["on", "off", "unknown"] = (
        "on" if status is PowerStatus.ON else "off" if status is PowerStatus.OFF else "unknown")
    log.info("event=bmc_query host_id=%s power=%s took_s=%.3f", action.host_id, power, time.monotonic() - started)
    return facts.BmcPowerReported(request_id=action.request_id, host_id=action.host_id, power=power,
                                  detail=f"BMC {credentials.address}:{credentials.port} says {status}")
