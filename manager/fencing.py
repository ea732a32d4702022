"""Glue between the core's Fence/QueryBmc actions and the fencer adapters (IPMI through pyghmi).

Runs in a worker thread (pyghmi blocks). One FencerChain per host is kept so that its race guard sees every fence
of that host; a host without a BMC cannot be fenced (the core then waits out the agent's isolation response).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kvmha.manager.adapters.fencer import FenceOutcome, FencerChain, PowerStatus
from kvmha.manager.adapters.ipmi import IpmiFencer
from kvmha.manager.adapters.repository import BmcCredentials
from kvmha.manager.core import actions, facts

FencerFactory = Callable[[BmcCredentials], FencerChain]

_chains: dict[BmcCredentials, FencerChain] = {}
_chains_lock = threading.Lock()


def ipmi_chain(credentials: BmcCredentials, race_delay_s: float = 0.0) -> FencerChain:
    """The default factory: one IPMI fencer per host, cached so concurrent fences of a host share one guard."""
    with _chains_lock:
        chain = _chains.get(credentials)
        if chain is None:
            fencer = IpmiFencer(credentials.address, credentials.port, credentials.user, credentials.password)
            chain = _chains[credentials] = FencerChain([fencer], race_delay_s=race_delay_s)
        return chain


def fence_host(factory: FencerFactory, credentials: BmcCredentials | None, action: actions.Fence,
               timeout_s: float) -> facts.FenceCompleted:
    if credentials is None:
        return facts.FenceCompleted(request_id=action.request_id, host_id=action.host_id, ok=False,
                                    already_off=False, detail="no BMC configured for this host")
    try:
        result = factory(credentials).fence(timeout_s)
    except Exception as error:  # an adapter bug must read as a failed fence, never as a success
        return facts.FenceCompleted(request_id=action.request_id, host_id=action.host_id, ok=False,
                                    already_off=False, detail=f"fencer error: {type(error).__name__}: {error}")
    ok = result.outcome in (FenceOutcome.FENCED, FenceOutcome.ALREADY_OFF)
    return facts.FenceCompleted(request_id=action.request_id, host_id=action.host_id, ok=ok,
                                already_off=result.outcome is FenceOutcome.ALREADY_OFF, detail=result.detail)


def query_bmc(factory: FencerFactory, credentials: BmcCredentials | None, action: actions.QueryBmc,
              timeout_s: float) -> facts.BmcPowerReported:
    if credentials is None:
        return facts.BmcPowerReported(request_id=action.request_id, host_id=action.host_id, power="unknown",
                                      detail="no BMC configured for this host")
    try:
        status = factory(credentials).power_status(timeout_s)
    except Exception as error:
        return facts.BmcPowerReported(request_id=action.request_id, host_id=action.host_id, power="unknown",
                                      detail=f"fencer error: {type(error).__name__}: {error}")
    power = {PowerStatus.ON: "on", PowerStatus.OFF: "off"}.get(status, "unknown")
    return facts.BmcPowerReported(request_id=action.request_id, host_id=action.host_id, power=power,  # type: ignore[arg-type]
                                  detail=f"BMC {credentials.address}:{credentials.port} says {status}")
