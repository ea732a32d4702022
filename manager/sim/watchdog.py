"""The simulated kvmha-watchdog and its device, after docs/watchdog.md's rules (T = the agent's watchdog timeout,
D = the device's timeout):

| the agent | the device fires | undone by |
|---|---|---|
| crashed (connection ended without the clean disarm) | D after | a restart that re-arms within D |
| frozen (SIGSTOP), or withholding its pets (isolation not complete) | T after its last pet | a pet within T - D |
| stopped cleanly | never (disarmed) | - |
| kvmha-watchdog itself killed | D after | nothing |

A firing device resets the host: every process and VM dies at once (the checker sees the VMs lost with the host),
the host boots again, the BMC reads "on" throughout. Only hosts with `watchdog` on have one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmha.manager.sim.world import SimHost

if TYPE_CHECKING:
    from kvmha.manager.sim.simulator import Simulator


def stop_petting(sim: Simulator, host: SimHost, why: str, *, latch_after_s: float, fire_after_s: float) -> None:
    """Nobody pets the device for `host` from now: it fires `fire_after_s` later unless the agent pets again before
    `latch_after_s` has passed."""
    if not host.watchdog or host.wd_broken or host.wd_expiring or not host.powered:
        return
    host.wd_expiring = True
    host.wd_latched_at = sim.now + latch_after_s
    sim.schedule(sim.now + fire_after_s, _fire, sim, host, host.boot_no, host.wd_generation, why)


def crashed(sim: Simulator, host: SimHost, why: str) -> None:
    stop_petting(sim, host, why, latch_after_s=host.watchdog_device_s, fire_after_s=host.watchdog_device_s)


def silent(sim: Simulator, host: SimHost, why: str) -> None:
    latch_s = max(0.0, host.watchdog_timeout_s - host.watchdog_device_s)
    stop_petting(sim, host, why, latch_after_s=latch_s, fire_after_s=host.watchdog_timeout_s)


def daemon_killed(sim: Simulator, host: SimHost) -> None:
    stop_petting(sim, host, "kvmha-watchdog killed", latch_after_s=0.0, fire_after_s=host.watchdog_device_s)


def pet(sim: Simulator, host: SimHost) -> bool:
    """The agent pets (or re-arms) again; False when it is too late (latched: the reset comes anyway)."""
    if not host.wd_expiring:
        return True
    if host.wd_latched_at is not None and sim.now >= host.wd_latched_at:
        return False
    host.wd_expiring, host.wd_latched_at = False, None
    host.wd_generation += 1
    return True


def disarm(host: SimHost) -> None:
    """A clean stop of the agent: the daemon closes the device with the magic close."""
    host.wd_expiring, host.wd_latched_at = False, None
    host.wd_generation += 1


def _fire(sim: Simulator, host: SimHost, boot_no: int, generation: int, why: str) -> None:
    if host.boot_no != boot_no or host.wd_generation != generation or not host.powered:
        return
    sim.note(f"sim: {host.name} watchdog expired ({why}): host reset")
    host.wd_expiring, host.wd_latched_at = False, None
    host.wd_generation += 1
    host.agent_frozen = False
    sim.agents.power_off(host)
    sim.agents.power_on(host)
