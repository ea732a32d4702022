"""The lab: N libvirt/KVM hosts on one machine, each powered by its own IPMI BMC simulator.

`Lab.up(n)` builds it and owns the BMC processes; `Lab.attach(state_dir)` drives a lab made by another process
(the `kvmha-lab` CLI, a test's fixture). Every process the lab ends is ended by PID: a host's init (which takes
its whole PID namespace with it), or an ipmi_sim the lab started. See docs/lab.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from kvmha.lab import bmcnet, fault, labdb, net, pacemaker, proc, report, vm
from kvmha.lab import host as hostfs
from kvmha.lab.bmc import BmcConfig, BmcSimulator
from kvmha.lab.fault import Fault
from kvmha.lab.guest import kvm_usable
from kvmha.lab.state import (
    AGENT,
    DAEMONS,
    DEFAULT_STATE_DIR,
    STATE_FILE,
    WATCHDOG,
    HostSpec,
    LabError,
    LabSpec,
    ManagerSlot,
    PidRef,
)

DEFAULT_SUBNET = "10.251.0.0/24"
DEFAULT_PREFIX = "kvmha"
MANAGER_PORT = 50051
BOOT_TIMEOUT_S = 90.0
POWER_OFF_TIMEOUT_S = 15.0
LIBVIRT_SOCK = "run/libvirt/libvirt-sock"

Power = Literal["on", "off"]


def _check_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, mounts, libvirtd)")


def manager_address(manager: str | None, subnet: str) -> str | None:
    """'' or None: no agents; 'default': the bridge address; 'ADDR' or 'ADDR:PORT' as given (port 50051)."""
    if not manager:
        return None
    if manager == "default":
        manager = net.bridge_address(subnet)
    return manager if ":" in manager else f"{manager}:{MANAGER_PORT}"


class Lab:
    def __init__(self, spec: LabSpec, bmcs: dict[str, BmcSimulator] | None = None) -> None:
        self.spec = spec
        self._bmcs = bmcs or {}  # only in the process that started them (the owner)
        self._inits: dict[str, proc.ProcInfo] = {}

    # ----- building and tearing down -------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        hosts: int = 3,
        *,
        subnet: str = DEFAULT_SUBNET,
        manager: str | None = None,
        state_dir: Path = DEFAULT_STATE_DIR,
        prefix: str = DEFAULT_PREFIX,
        agent_settings: Mapping[str, object] | None = None,
        as_keeper: bool = False,
        cache_dir: Path | None = None,
        watchdog_device_timeout_s: int = 0,
        bmc_subnet: str | None = None,
        stack: str = "kvmha",
        stack_profile: str = "defaults",
        managers: int = 0,
    ) -> Lab:
        """Build a lab of `hosts` hosts and wait until every host's libvirtd answers. On failure, undo it all.

        as_keeper: this process stays alive as the owner of the BMC processes (kvmha.lab.keeper); a `down` from
        another process then asks it to tear the lab down, so the BMCs are ended by their own parent.
        cache_dir: a folder for libvirt's QEMU capability cache that outlives the lab (tests share one per session,
        saving each lab a probe); by default the cache lives and dies with the state dir.
        watchdog_device_timeout_s: > 0 gives every host a hardware watchdog with this timeout, kvmha-watchdog to
        drive it and agents that arm it (kvmha.lab.watchdog); needs a manager (agents).
        bmc_subnet: the lab's BMC network (kvmha.lab.bmcnet); by default the lab subnet shifted by 256 addresses.
        stack: "kvmha" (libvirt and, with a manager, the agent) or "pacemaker" (corosync + Pacemaker instead of the
        agent, configured with pacemaker.PROFILES[stack_profile]; see kvmha.lab.pacemaker)."""
        _check_root()
        if not 1 <= hosts <= 20:
            raise LabError("between 1 and 20 hosts")
        net.host_address(subnet, hosts)  # the last host must fit in the subnet: fail before making anything
        if not re.fullmatch(r"[a-z][a-z0-9]{0,10}", prefix):
            raise LabError("prefix: 1-11 lower-case letters or digits (interface names are at most 15 characters)")
        state_dir = Path(state_dir).absolute()
        if (state_dir / STATE_FILE).exists():
            raise LabError(f"a lab is already up in {state_dir}: `kvmha-lab down --state-dir {state_dir}` first")
        if watchdog_device_timeout_s and not manager:
            raise LabError("a watchdog per host needs agents to arm it (a --manager)")
        if stack == pacemaker.STACK:
            if manager:
                raise LabError("the pacemaker stack runs no kvmha agents: no --manager with it")
            pacemaker.check_installed()
            if stack_profile not in pacemaker.PROFILES:
                raise LabError(f"pacemaker profile {stack_profile!r}: one of {', '.join(pacemaker.PROFILES)}")
        elif stack != "kvmha":
            raise LabError(f"unknown stack {stack!r} (kvmha or {pacemaker.STACK})")
        if not 0 <= managers <= min(net.MANAGER_SLOTS, bmcnet.CLIENT_SLOTS):
            raise LabError(f"between 0 and {net.MANAGER_SLOTS} managers")
        if managers and stack != "kvmha":
            raise LabError("several managers run only with the kvmha stack")
        if managers and manager not in (None, "", "default"):
            raise LabError("with --managers the agents report to the lab's managers: no --manager address")
        slot_addresses = [net.manager_address(subnet, k) for k in range(1, managers + 1)]
        if managers:
            manager = slot_addresses[0]
        bmc_plan = bmcnet.BmcNet(bmc_subnet or bmcnet.subnet_for(subnet), prefix)
        bmc_plan.check_room(hosts)
        for bridge in (f"{prefix}-br0", bmc_plan.bridge):
            if net.link_exists(bridge):
                raise LabError(f"{bridge} exists already: another lab with prefix {prefix!r} is up")
        state_dir.mkdir(parents=True, exist_ok=True)
        spec = LabSpec(
            state_dir=str(state_dir),
            prefix=prefix,
            subnet=subnet,
            bridge=f"{prefix}-br0",
            bridge_address=net.bridge_address(subnet),
            shared_dir=str(state_dir / "shared"),
            manager=manager_address(manager, subnet),
            domain_type="kvm" if kvm_usable() else "qemu",
            bmc_user="admin",
            bmc_password=uuid.uuid4().hex[:16],
            cache_dir=str(Path(cache_dir).absolute()) if cache_dir else "",
            watchdog_device_timeout_s=int(watchdog_device_timeout_s),
            bmc_subnet=bmc_plan.subnet,
            stack=stack,
            stack_profile=stack_profile if stack == pacemaker.STACK else "",
            managers=[
                ManagerSlot(name=f"m{k}", index=k, netns=f"{prefix}-m{k}", veth=f"{prefix}-m{k}",
                            address=slot_addresses[k - 1], bmc_veth=bmc_plan.client_veth(k),
                            bmc_address=bmc_plan.client_address(k))
                for k in range(1, managers + 1)
            ],
            agent_managers=[f"{address}:{MANAGER_PORT}" for address in slot_addresses],
        )
        if as_keeper:
            me = proc.info(os.getpid())
            assert me is not None
            spec.keeper = PidRef(me.pid, me.start_ticks)
        lab = cls(spec)
        try:
            lab._build(hosts, agent_settings or {})
        except BaseException:
            try:
                lab.down()
            except Exception as cleanup_error:  # the first failure is the one to report; this one is shown too
                print(f"kvmha-lab: clean-up after a failed up also failed: {cleanup_error}", file=sys.stderr)
            raise
        return lab

    def _build(self, count: int, agent_settings: Mapping[str, object]) -> None:
        spec = self.spec
        state_dir = Path(spec.state_dir)
        for sub in ("shared/" + hostfs.DISKS_DIR_NAME, "shared/" + hostfs.LEASES_DIR_NAME, "shared/vms", "hosts"):
            (state_dir / sub).mkdir(parents=True, exist_ok=True)
        Path(hostfs.cache_dir(spec)).mkdir(parents=True, exist_ok=True)
        # Mount points the hosts need but that a machine without a running libvirtd may lack; removed by down.
        for needed in (Path(hostfs.RUN_LIBVIRT), net.NETNS_DIR):
            if not needed.exists():
                needed.mkdir(mode=0o755)
                spec.created_dirs.append(str(needed))
        spec.netns_mount_created = not net.netns_dir_mounted()
        spec.save()  # from here on, `down` from any process can undo what follows
        net.create_bridge(spec.bridge, spec.subnet)
        bmc_plan = self.bmc_net
        assert bmc_plan is not None
        bmcnet.create_bridge(bmc_plan)
        for slot in spec.managers:
            net.create_host_net(spec.bridge, slot.netns, slot.veth, slot.address, spec.subnet)
            bmcnet.plug_client(bmc_plan, slot.netns, slot.index)
        if spec.managers:
            labdb.start(spec)
        for index in range(1, count + 1):
            name = f"h{index}"
            host = HostSpec(
                name=name,
                index=index,
                netns=f"{spec.prefix}-{name}",
                veth=f"{spec.prefix}-{name}",
                address=net.host_address(spec.subnet, index),
                bmc_port=bmcnet.BMC_PORT,
                host_uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"kvmha-lab:{spec.state_dir}:{name}")),
                dir=str(state_dir / "hosts" / name),
                bmc_address=bmc_plan.bmc_address(index),
                bmc_netns=bmc_plan.bmc_netns(name),
            )
            spec.hosts.append(host)
            spec.save()
            net.create_host_net(spec.bridge, host.netns, host.veth, host.address, spec.subnet)
            bmcnet.create_bmc_ns(bmc_plan, name, index)
            bmcnet.plug_host(bmc_plan, host.netns, index)
            hostfs.prepare(spec, host, agent_settings)
        if spec.stack == pacemaker.STACK:  # corosync.conf lists every node: written once all are known
            for host in spec.hosts:
                pacemaker.prepare(spec, host)
        # The first host probes QEMU's capabilities into the shared cache alone; the others then find them there.
        first, *rest = spec.hosts
        self._start_bmc(first)
        self.wait_ready(first.name)
        for host in rest:
            self._start_bmc(host)
        for host in rest:
            self.wait_ready(host.name)
        if spec.stack == pacemaker.STACK:
            pacemaker.configure(self)
        spec.ready = True
        spec.save()

    def _bmc_config(self, host: HostSpec) -> BmcConfig:
        return BmcConfig(
            name=f"{self.spec.prefix}-{host.name}",
            port=host.bmc_port,
            address=host.bmc_address,
            netns=host.bmc_netns or None,
            workdir=Path(host.dir) / "bmc",
            startcmd=hostfs.startcmd(host, self.spec),
            user=self.spec.bmc_user,
            password=self.spec.bmc_password,
            poweroff_wait_s=1,
            kill_wait_s=1,  # unshare blocks SIGTERM, so power off is SIGKILL after this: keep it short
        )

    def _start_bmc(self, host: HostSpec) -> None:
        bmc = BmcSimulator(self._bmc_config(host))
        bmc.start()
        self._bmcs[host.name] = bmc
        assert bmc.pid is not None
        found = proc.info(bmc.pid)
        assert found is not None
        self.spec.bmcs[host.name] = PidRef(bmc.pid, found.start_ticks)
        self.spec.save()

    @classmethod
    def attach(cls, state_dir: Path = DEFAULT_STATE_DIR) -> Lab:
        return cls(LabSpec.load(Path(state_dir).absolute()))

    def down(self, keep_state: bool = False) -> None:
        """Undo everything: hosts (by their init's PID), BMCs (by PID), network, mount points, state dir."""
        _check_root()
        keeper = self.spec.keeper
        if keeper and keeper.pid != os.getpid() and proc.alive(keeper.pid, keeper.start_ticks):
            # The keeper owns (and so reaps) the BMC processes: let it tear down, then finish whatever is left.
            proc.kill(keeper.pid, keeper.start_ticks, signal.SIGTERM)
            proc.wait_gone([proc.ProcInfo(keeper.pid, 0, "", keeper.start_ticks, 0)], 60.0)
        for ref in self.spec.companions.values():
            self._end(ref)  # e.g. the manager in front of the lab: before the hosts, so it sees no mass failure
        labdb.stop(self.spec)  # after the managers that use it
        for ref in self.spec.bmcs.values():
            proc.kill(ref.pid, ref.start_ticks, signal.SIGCONT)  # a BMC stopped by the "bmc" fault must hear SIGTERM
        for host in self.spec.hosts:
            self._kill_host(host)
        for name, bmc in list(self._bmcs.items()):
            bmc.stop()
            del self._bmcs[name]
        for ref in self.spec.bmcs.values():
            self._end(ref)
        self.spec.bmcs.clear()
        for host in self.spec.hosts:
            net.delete_host_net(host.netns, host.veth)
        for slot in self.spec.managers:
            net.delete_host_net(slot.netns, slot.veth)
        net.delete_bridge(self.spec.bridge)
        if self.bmc_net is not None:  # after the BMCs: their namespaces go with it
            bmcnet.delete(self.bmc_net, [(host.name, host.index) for host in self.spec.hosts])
        net.undo_netns_dir(created_dir=str(net.NETNS_DIR) in self.spec.created_dirs)
        for created in self.spec.created_dirs:
            path = Path(created)
            # Someone else's private libvirtd may use the folder we made as its mount point by now: keep it then.
            unused = path.is_dir() and not any(path.iterdir()) and not proc.mounted_anywhere(created)
            if path != net.NETNS_DIR and unused:
                path.rmdir()
        state_dir = Path(self.spec.state_dir)
        if keep_state:
            (state_dir / STATE_FILE).unlink(missing_ok=True)
        else:
            shutil.rmtree(state_dir, ignore_errors=True)

    def _kill_host(self, host: HostSpec) -> None:
        init = self.init(host.name)
        if init is None:
            return
        members = proc.members(init.pid)
        # PID 1 of the host: the kernel ends every process of its namespace with it.
        proc.kill(init.pid, init.start_ticks)
        left = proc.wait_gone(members, POWER_OFF_TIMEOUT_S)
        if left:
            raise LabError(f"{host.name}: processes {[p.pid for p in left]} survived their host")

    @staticmethod
    def _end(ref: PidRef) -> None:
        """End an ipmi_sim or a companion started by another process: SIGTERM, then SIGKILL; never a reused PID."""
        if not proc.alive(ref.pid, ref.start_ticks):
            return
        proc.kill(ref.pid, ref.start_ticks, signal.SIGTERM)
        target = [proc.ProcInfo(ref.pid, 0, "", ref.start_ticks, 0)]
        if proc.wait_gone(target, 3.0):
            proc.kill(ref.pid, ref.start_ticks, signal.SIGKILL)
            proc.wait_gone(target, 3.0)

    # ----- managers (labs made with managers=N) -------------------------------------------------------------

    @property
    def managers(self) -> list[ManagerSlot]:
        return list(self.spec.managers)

    def cut_manager(self, name: str, cut: bool = True) -> None:
        """Cut (or restore) both cables of a manager's namespace, the lab bridge and the BMC network: it reaches no
        agent, no database and no BMC, and nobody reaches it; the process runs on."""
        slot = self.spec.manager_slot(name)
        for veth in (slot.veth, slot.bmc_veth):
            net.set_link(veth, not cut)

    def manager_cut(self, name: str) -> bool:
        slot = self.spec.manager_slot(name)
        return not (net.link_is_up(slot.veth) and net.link_is_up(slot.bmc_veth))

    # ----- looking at hosts -----------------------------------------------------------------------------------

    @property
    def bmc_net(self) -> bmcnet.BmcNet | None:
        """The lab's BMC network: its subnet, bridge and addresses (None for a lab made before it existed)."""
        return bmcnet.BmcNet(self.spec.bmc_subnet, self.spec.prefix) if self.spec.bmc_subnet else None

    def bmc_credentials(self, name: str) -> tuple[str, int, str, str]:
        """(address, UDP port, user, password) of the host's BMC, as a fencer or a cluster stack is given them."""
        host = self.host(name)
        return host.bmc_address, host.bmc_port, self.spec.bmc_user, self.spec.bmc_password

    @property
    def hosts(self) -> list[HostSpec]:
        return list(self.spec.hosts)

    def host(self, name: str) -> HostSpec:
        return self.spec.host(name)

    def init(self, name: str) -> proc.ProcInfo | None:
        """The host's PID 1 (root namespace PID), None when the host is powered off."""
        cached = self._inits.get(name)
        if cached is not None and proc.alive(cached.pid, cached.start_ticks):
            return cached
        found = proc.find_init(str(Path(self.host(name).dir) / "boot.json"))
        if found is not None:
            self._inits[name] = found
        return found

    def processes(self, name: str) -> list[proc.ProcInfo]:
        """Every process of the host (its PID namespace), with root namespace PIDs."""
        init = self.init(name)
        return proc.members(init.pid) if init else []

    def services(self, name: str) -> dict[str, int]:
        """Daemon name -> root namespace PID, for the lab's daemons running in the host."""
        wanted = (*DAEMONS, AGENT, WATCHDOG, *pacemaker.DAEMONS)
        return {p.comm: p.pid for p in self.processes(name) if p.comm in wanted}

    def expected_services(self) -> tuple[str, ...]:
        if self.spec.stack == pacemaker.STACK:
            return (*DAEMONS, *pacemaker.DAEMONS)
        if not self.spec.manager:
            return DAEMONS
        return (*DAEMONS, WATCHDOG, AGENT) if self.spec.watchdog_device_timeout_s else (*DAEMONS, AGENT)

    def exec(
        self, name: str, argv: Sequence[str], *, check: bool = True, timeout_s: float = 60.0, input_text: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the host: its network, mount and PID namespaces."""
        init = self.init(name)
        if init is None:
            raise LabError(f"{name} is powered off")
        cmd = ["nsenter", "-t", str(init.pid), "-m", "-n", "-p", "--", *argv]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, input=input_text, check=False)
        if check and done.returncode != 0:
            raise LabError(f"{name}: {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def virsh(self, name: str, *args: str, check: bool = True) -> str:
        return self.exec(name, ["virsh", "-q", "-c", "qemu:///system", *args], check=check).stdout

    def libvirt_answers(self, name: str) -> bool:
        """libvirtd's socket in the host accepts a connection (seen through the host's root, no process spawned)."""
        init = self.init(name)
        if init is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(f"/proc/{init.pid}/root/{LIBVIRT_SOCK}")
            except OSError:
                return False
        return True

    def wait_ready(self, name: str, timeout_s: float = BOOT_TIMEOUT_S) -> None:
        """Wait until the host is booted: its services run and libvirtd answers a real call."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            running = self.services(name)
            booted = all(s in running for s in self.expected_services()) and self.libvirt_answers(name)
            if booted and self.exec(name, ["virsh", "-c", "qemu:///system", "version"], check=False).returncode == 0:
                return
            time.sleep(0.2)
        boot_log = Path(self.host(name).dir) / "boot.log"
        tail = boot_log.read_text(errors="replace")[-1500:] if boot_log.exists() else "(no boot log)"
        raise LabError(f"{name} did not boot within {timeout_s:.0f} s; boot.log ends with:\n{tail}")

    # ----- power, through IPMI --------------------------------------------------------------------------------

    def bmc(self, name: str) -> BmcSimulator:
        """A client of the host's BMC: power() and chassis_power() speak IPMI (ipmitool lanplus) to ipmi_sim."""
        return self._bmcs.get(name) or BmcSimulator(self._bmc_config(self.host(name)))

    def power_state(self, name: str) -> Power:
        return self.bmc(name).power()

    def power(self, name: str, action: Power, *, wait: bool = True) -> None:
        """Chassis power on/off through the host's BMC; waits until every process of the host is gone (off) or
        the host has booted (on)."""
        members = self.processes(name) if action == "off" else []
        self.bmc(name).chassis_power(action)
        if not wait:
            return
        if action == "on":
            self.wait_ready(name)
            return
        deadline = time.monotonic() + POWER_OFF_TIMEOUT_S
        left = proc.wait_gone(members, POWER_OFF_TIMEOUT_S)
        # The host's processes die first; the power supply (kvmha.lab.power) then takes its network down and
        # exits, and only then does the BMC read "off": wait for that too.
        while not left and self.power_state(name) != "off":
            if time.monotonic() > deadline:
                raise LabError(f"{name}: its processes are gone but the BMC still says on")
            time.sleep(0.1)
        if left:
            raise LabError(f"{name}: power off did not end the host (left: {[p.pid for p in left]})")
        self._inits.pop(name, None)

    # ----- faults and VMs (the work is in kvmha.lab.fault and kvmha.lab.vm) ----------------------------------

    def fail(self, name: str, kind: Fault) -> None:
        fault.fail(self, name, kind)

    def heal(self, name: str) -> list[str]:
        return fault.heal(self, name)

    def faults(self, name: str) -> list[str]:
        return fault.faults(self, name)

    def vm_prepare(self, name: str, memory_mib: int = 32, disk_format: str = "raw") -> str:
        """Write the VM's disk and definition on the shared storage without defining it anywhere; returns the
        domain XML (what a manager would be given to place the VM)."""
        return vm.prepare(self, name, memory_mib, disk_format).read_text()

    def vm_create(
        self, name: str, host: str, memory_mib: int = 32, start: bool = True, disk_format: str = "raw"
    ) -> None:
        vm.create(self, name, host, memory_mib, start, disk_format)

    def vm_define(self, name: str, host: str) -> None:
        vm.define(self, name, host)

    def vm_hosts(self, name: str) -> list[str]:
        """Hosts whose PID namespace holds a QEMU for the VM (read from /proc)."""
        return [host for host, _ in vm.qemu_of(self, name)]

    def running_vms(self) -> dict[str, dict[str, int]]:
        """Host -> {VM name: QEMU PID} for every powered-on host (one pass over /proc)."""
        return vm.running_everywhere(self)

    def vm_kill(self, name: str) -> str:
        return vm.kill(self, name)

    def guest_shutdown(self, name: str) -> str:
        return vm.guest_shutdown(self, name)

    def guest_busy(self, name: str) -> str:
        return vm.guest_busy(self, name)

    def domstate(self, host: str, name: str) -> tuple[str, str]:
        return vm.domstate(self, host, name)

    # ----- summary ---------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Hosts, addresses, BMC ports, power, faults, PIDs and running VMs, read live (see kvmha.lab.report)."""
        return report.status(self)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.down()
