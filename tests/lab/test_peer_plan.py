"""The pure parts of the BMC network and the pacemaker stack: address plan, corosync.conf, reading pacemaker.log.
No lab, no root: these run in `make test-fast`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmha.lab import bmcnet, pacemaker, peerlog
from kvmha.lab.state import HostSpec, LabSpec


def test_bmc_subnet_is_the_lab_subnet_shifted_by_256_addresses() -> None:
    assert bmcnet.subnet_for("10.251.0.0/24") == "10.251.1.0/24"
    assert bmcnet.subnet_for("10.251.0.192/26") == "10.251.1.192/26"
    assert bmcnet.subnet_for("10.251.0.64/26") == "10.251.1.64/26"
    with pytest.raises(bmcnet.BmcNetError, match="larger than a /24"):
        bmcnet.subnet_for("10.251.0.0/16")


def test_bmc_plan_addresses_and_names() -> None:
    plan = bmcnet.BmcNet("10.251.1.192/26", "kvmhat")
    assert plan.root_address == "10.251.1.193"
    assert [plan.client_address(1), plan.client_address(8)] == ["10.251.1.194", "10.251.1.201"]
    assert plan.bmc_address(1) == "10.251.1.203" and plan.host_address(1) == "10.251.1.233"
    assert plan.host_address(20) == "10.251.1.252"  # the last host still fits a /26
    assert (plan.bridge, plan.bmc_netns("h2"), plan.bmc_veth(2), plan.host_veth(2)) == \
        ("kvmhat-bmc", "kvmhat-bmc-h2", "kvmhat-b2", "kvmhat-o2")
    assert all(len(name) <= 15 for name in (bmcnet.BmcNet("10.251.1.0/24", "a" * 11).bridge,
                                            bmcnet.BmcNet("10.251.1.0/24", "a" * 11).bmc_veth(20)))
    plan.check_room(20)
    with pytest.raises(bmcnet.BmcNetError, match="at most 20"):
        plan.check_room(21)
    with pytest.raises(bmcnet.BmcNetError, match="does not fit"):
        bmcnet.BmcNet("10.251.1.0/28", "x").check_room(2)
    with pytest.raises(bmcnet.BmcNetError, match="outside the lab range"):
        bmcnet.BmcNet("192.168.1.0/24", "x")
    with pytest.raises(bmcnet.BmcNetError, match="slot"):
        plan.client_address(9)


def _spec(hosts: int, profile: str) -> LabSpec:
    spec = LabSpec(state_dir="/tmp/x", prefix="kvmhat", subnet="10.251.0.192/26", bridge="kvmhat-br0",
                   bridge_address="10.251.0.193", shared_dir="/tmp/x/shared", manager=None, domain_type="kvm",
                   bmc_user="admin", bmc_password="pw", stack="pacemaker", stack_profile=profile)
    spec.hosts = [HostSpec(name=f"h{i}", index=i, netns=f"kvmhat-h{i}", veth=f"kvmhat-h{i}",
                           address=f"10.251.0.{202 + i}", bmc_port=623, host_uuid="u", dir=f"/tmp/x/hosts/h{i}")
                  for i in range(1, hosts + 1)]
    return spec


def test_corosync_conf_per_profile() -> None:
    defaults = pacemaker.corosync_conf(_spec(3, "defaults"))
    assert "token:" not in defaults and "two_node" not in defaults  # corosync's own default token
    assert "ring0_addr: 10.251.0.205" in defaults and "nodeid: 3" in defaults and "transport: knet" in defaults
    assert "watchdog_device: off" in defaults and "to_syslog: no" in defaults
    tuned = pacemaker.corosync_conf(_spec(2, "tuned"))
    assert "token: 1000" in tuned and "two_node: 1" in tuned
    assert "stonith-action off" in pacemaker.describe(_spec(2, "tuned"))


# Lines as Pacemaker 2.1.5 (Debian 12) writes them, from a lab run: the phases are read from exactly these wordings.
LOG = """\
Nov 29 16:16:07.505 vm pacemaker-controld  [59] (update_peer_state_iter) 	notice: Node h3 state is now lost | nodeid=3
Nov 29 16:16:08.549 vm pacemaker-schedulerd[58] (pe_fence_node) 	warning: Cluster node h3 will be fenced: peer is \
no longer part of the cluster
Nov 29 16:16:08.561 vm pacemaker-controld  [59] (controld_execute_fence_action) 	notice: Requesting fencing \
(reboot) of node h3 | action=1 timeout=60000
Nov 29 16:16:11.153 vm pacemaker-controld  [59] (execute_rsc_action) 	notice: Initiating start operation \
p1_start_0 locally on h2 | action 13
Nov 29 16:16:11.153 vm pacemaker-controld  [59] (handle_fence_notification) 	notice: Peer h3 was terminated \
(reboot) by h1 on behalf of pacemaker-controld.59@h2: OK | event=df8ebcd8
Nov 29 16:16:13.925 vm pacemaker-controld  [59] (log_executor_event) 	notice: Result of start operation for p1 \
on h2: ok | CIB update 101, graph action confirmed; call=26 key=p1_start_0 rc=0
Nov 29 16:16:20.277 vm pacemaker-controld  [59] (log_executor_event) 	notice: Result of monitor operation for \
p2 on h2: not running | CIB update 28, graph action unconfirmed; call=23 key=p2_monitor_10000 rc=7
"""


def test_pacemaker_log_lines_give_the_phases(tmp_path: Path) -> None:
    log = tmp_path / "pacemaker.log"
    log.write_text(LOG)
    t0 = peerlog._epoch("Nov 29 16:16:00.000")
    lines = peerlog.pacemaker_lines({"h1": log}, t0)
    assert len(lines) == 7 and lines[0][1] == "h1"
    assert lines[-1][0] - t0 == pytest.approx(20.277, abs=0.001)

    def first(pattern: str) -> float | None:
        at = peerlog._first(lines, pattern)
        return None if at is None else round(at - t0, 3)

    node, vm = re.escape("h3"), re.escape("p1")
    assert first(peerlog.NODE_LOST.format(node=node)) == 7.505
    assert first(peerlog.FENCE_REQUESTED.format(node=node)) == 8.561
    assert first(peerlog.FENCED.format(node=node)) == 11.153
    assert first(peerlog.START_ORDERED.format(vm=vm)) == 11.153
    assert first(peerlog.STARTED.format(vm=vm)) == 13.925
    assert first(peerlog.MONITOR_FAILED.format(vm=re.escape("p2"))) == 20.277
    assert first(peerlog.NODE_LOST.format(node=re.escape("h1"))) is None
    assert peerlog.pacemaker_lines({"h1": log}, t0 + 3600) == []
