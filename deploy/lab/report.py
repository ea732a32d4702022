"""`kvmha-lab status`: what the lab looks like right now, read from the machine (never from memory)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmha.lab import fault, proc, vm, watchdog

if TYPE_CHECKING:
    from kvmha.lab.lab import Lab


def _power_or_error(lab: Lab, name: str) -> str:
    try:
        return lab.power_state(name)
    except Exception as exc:  # a dead BMC is a state to show, not a reason to fail `status`
        return f"unknown ({exc})"


def host_status(lab: Lab, name: str) -> dict[str, Any]:
    host = lab.host(name)
    init = lab.init(name)
    bmc_ref = lab.spec.bmcs.get(name)
    return {
        "name": host.name,
        "address": host.address,
        "netns": host.netns,
        "host_uuid": host.host_uuid,
        "bmc": {"address": host.bmc_address, "port": host.bmc_port, "pid": bmc_ref.pid if bmc_ref else None},
        "power": _power_or_error(lab, name),
        "faults": fault.faults(lab, name),
        "pids": {"init": init.pid if init else None, **lab.services(name)},
        "vms": vm.running_on(lab, name),
        **({"watchdog": {"device": watchdog.device_state(lab, name), "resets": len(watchdog.resets(lab, name))}}
           if watchdog.enabled(lab.spec) else {}),
    }


def status(lab: Lab) -> dict[str, Any]:
    spec = lab.spec
    return {
        "state_dir": spec.state_dir,
        "subnet": spec.subnet,
        "bridge": spec.bridge,
        "bridge_address": spec.bridge_address,
        "manager": spec.manager,
        "shared_dir": spec.shared_dir,
        "domain_type": spec.domain_type,
        "bmc_subnet": spec.bmc_subnet,
        "stack": spec.stack + (f" ({spec.stack_profile})" if spec.stack_profile else ""),
        "bmc_user": spec.bmc_user,
        "hosts": [host_status(lab, host.name) for host in spec.hosts],
        "database": spec.database_url,
        "managers": [manager_status(lab, slot.name) for slot in spec.managers],
    }


def manager_status(lab: Lab, name: str) -> dict[str, Any]:
    slot = lab.spec.manager_slot(name)
    ref = lab.spec.companions.get(f"manager-{name}")
    pid = ref.pid if ref is not None and proc.alive(ref.pid, ref.start_ticks) else None
    return {"name": name, "address": slot.address, "netns": slot.netns, "bmc_address": slot.bmc_address,
            "pid": pid, "paused": bool(pid and proc.stopped(pid)), "cut": lab.manager_cut(name)}
