"""The lab's BMC network: a second bridge, an out-of-band network as in a real data centre, on which every host's
BMC answers IPMI on its own address and the standard port 623.

Who is on it (addresses are offsets into the BMC subnet; with the default lab subnet 10.251.0.0/24 the BMC subnet
is 10.251.1.0/24, i.e. the lab subnet shifted by 256 addresses, so every lab's two networks stay apart):

    +1        the root namespace, on bridge <prefix>-bmc   (a manager running on the machine reaches every BMC)
    +2..+9    client namespaces, slot 1..8                 (managers in their own network namespaces, issue #15)
    +10+N     the BMC of host hN, in netns <prefix>-bmc-hN (ipmi_sim, UDP 623; its cable: veth <prefix>-bN)
    +40+N     host hN's second NIC, eth1                   (stonith from inside the hosts: fence_ipmilan, sbd...)

Invariants: only addresses inside the BMC subnet (itself inside 10.251.0.0/16) are configured, IPv6 is off on every
interface, and nothing of the machine's own network is touched. Every namespace and veth made here is named after
the lab's prefix and removed by `delete` (or by deleting the namespace that holds the other end of a veth).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from kvmha.lab import net

BMC_PORT = 623  # IPMI over LAN (RMCP+), as on real BMCs: each BMC has a network stack of its own
LAB_RANGE = ipaddress.ip_network("10.251.0.0/16")
SHIFT = 256  # BMC subnet = lab subnet + 256 addresses (10.251.0.0/24 -> 10.251.1.0/24)
ROOT_OFFSET = 1
CLIENT_OFFSET = 1  # slot k (1..8) -> +1+k
CLIENT_SLOTS = 8
BMC_OFFSET = 10
HOST_OFFSET = 40
MAX_HOSTS = 20
HOST_IFNAME = "eth1"  # a host's NIC on the BMC network (eth0 is its NIC on the lab network)
BMC_IFNAME = "eth0"  # inside a BMC's namespace


class BmcNetError(net.LabNetError):
    pass


def subnet_for(lab_subnet: str) -> str:
    """The BMC subnet of a lab: its subnet shifted by 256 addresses, same prefix length, inside 10.251.0.0/16."""
    lab = ipaddress.ip_network(lab_subnet)
    if lab.prefixlen < 24:
        raise BmcNetError(f"cannot derive a BMC subnet from {lab_subnet} (larger than a /24): give one explicitly")
    shifted = ipaddress.ip_network(f"{lab.network_address + SHIFT}/{lab.prefixlen}")
    return str(shifted)


@dataclass(frozen=True)
class BmcNet:
    """The address plan of one lab's BMC network (pure: no I/O)."""

    subnet: str
    prefix: str  # the lab's prefix: names of bridge, namespaces, veths

    def __post_init__(self) -> None:
        network = ipaddress.ip_network(self.subnet)
        if not network.subnet_of(LAB_RANGE):  # type: ignore[arg-type]
            raise BmcNetError(f"BMC subnet {self.subnet} is outside the lab range {LAB_RANGE}")

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-bmc"

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def _address(self, offset: int, what: str) -> str:
        network = ipaddress.ip_network(self.subnet)
        address = network.network_address + offset
        if address not in network or address == network.broadcast_address:
            raise BmcNetError(f"{what} does not fit in the BMC subnet {self.subnet} (a /26 or larger is needed)")
        return str(address)

    @property
    def root_address(self) -> str:
        return self._address(ROOT_OFFSET, "the root namespace's address")

    def bmc_address(self, index: int) -> str:
        return self._address(BMC_OFFSET + index, f"the BMC of host {index}")

    def host_address(self, index: int) -> str:
        return self._address(HOST_OFFSET + index, f"host {index}'s BMC-network NIC")

    def client_address(self, slot: int) -> str:
        if not 1 <= slot <= CLIENT_SLOTS:
            raise BmcNetError(f"client slot {slot}: 1..{CLIENT_SLOTS}")
        return self._address(CLIENT_OFFSET + slot, f"client slot {slot}")

    def bmc_netns(self, host: str) -> str:
        return f"{self.prefix}-bmc-{host}"

    def bmc_veth(self, index: int) -> str:
        return f"{self.prefix}-b{index}"

    def host_veth(self, index: int) -> str:
        return f"{self.prefix}-o{index}"

    def client_veth(self, slot: int) -> str:
        return f"{self.prefix}-c{slot}"

    def check_room(self, hosts: int) -> None:
        """Fail before anything is made when the plan cannot hold `hosts` hosts."""
        if hosts > MAX_HOSTS:
            raise BmcNetError(f"at most {MAX_HOSTS} hosts on a BMC network")
        self.host_address(hosts)
        self.client_address(CLIENT_SLOTS)


# ----- making and removing it (root only) ------------------------------------------------------------------------


def plug(bridge: str, netns: str, veth: str, ifname: str, address: str, prefixlen: int) -> None:
    """A veth from `bridge` into `netns`, named `ifname` there, with one IPv4 address, IPv6 off, up (lo too)."""
    net.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", ifname, "netns", netns])
    net._no_ipv6(veth)
    net._no_ipv6(ifname, netns)
    net.run(["ip", "link", "set", veth, "master", bridge, "up"])
    net.run(["ip", "-n", netns, "link", "set", "lo", "up"])
    net.run(["ip", "-n", netns, "addr", "add", f"{address}/{prefixlen}", "dev", ifname])
    net.run(["ip", "-n", netns, "link", "set", ifname, "up"])


def create_bridge(plan: BmcNet) -> None:
    net.run(["ip", "link", "add", plan.bridge, "type", "bridge"])
    net._no_ipv6(plan.bridge)
    net.run(["ip", "addr", "add", f"{plan.root_address}/{plan.prefixlen}", "dev", plan.bridge])
    net.run(["ip", "link", "set", plan.bridge, "up"])


def create_bmc_ns(plan: BmcNet, host: str, index: int) -> None:
    """The namespace the host's ipmi_sim runs in: lo (its system-interface channel) and eth0 on the BMC bridge."""
    netns = plan.bmc_netns(host)
    net.run(["ip", "netns", "add", netns])
    net._no_ipv6("all", netns)
    net._no_ipv6("default", netns)
    plug(plan.bridge, netns, plan.bmc_veth(index), BMC_IFNAME, plan.bmc_address(index), plan.prefixlen)


def plug_host(plan: BmcNet, host_netns: str, index: int) -> None:
    """The host's second NIC (eth1) on the BMC network, so that a cluster stack inside it can fence."""
    plug(plan.bridge, host_netns, plan.host_veth(index), HOST_IFNAME, plan.host_address(index), plan.prefixlen)


def plug_client(plan: BmcNet, netns: str, slot: int, ifname: str = HOST_IFNAME) -> str:
    """Put an existing namespace (a manager's, issue #15) on the BMC network; returns its address there. The veth
    goes with the namespace when that is deleted; `delete` removes it too."""
    address = plan.client_address(slot)
    plug(plan.bridge, netns, plan.client_veth(slot), ifname, address, plan.prefixlen)
    return address


def delete(plan: BmcNet, hosts: list[tuple[str, int]]) -> None:
    """Remove the BMC namespaces, every veth of the plan and the bridge; what is already gone is fine."""
    for host, index in hosts:
        if net.netns_exists(plan.bmc_netns(host)):
            net.run(["ip", "netns", "delete", plan.bmc_netns(host)], check=False)
        for veth in (plan.bmc_veth(index), plan.host_veth(index)):
            if net.link_exists(veth):
                net.run(["ip", "link", "delete", veth], check=False)
    for slot in range(1, CLIENT_SLOTS + 1):
        if net.link_exists(plan.client_veth(slot)):
            net.run(["ip", "link", "delete", plan.client_veth(slot)], check=False)
    net.delete_bridge(plan.bridge)
