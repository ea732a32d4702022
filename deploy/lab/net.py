"""The lab network: one bridge in the root namespace (the manager's side) and one veth per host namespace.

Only the lab's own subnet and loopback are ever configured; IPv6 is switched off on every lab interface so the
hosts do not even send link-local router solicitations anywhere.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path

from kvmha.lab.state import LabError

NETNS_DIR = Path("/run/netns")


class LabNetError(LabError):
    pass


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise LabNetError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def bridge_address(subnet: str) -> str:
    """The root namespace's address on the bridge (first address of the subnet): where a manager listens."""
    net = ipaddress.ip_network(subnet)
    return str(net.network_address + 1)


MANAGER_SLOTS = 8


def manager_address(subnet: str, index: int) -> str:
    """Manager N (own namespace, issue 15) is at network + 1 + N (10.251.0.2 for m1 in 10.251.0.0/24): between the
    bridge (+1) and the hosts (+11...)."""
    if not 1 <= index <= MANAGER_SLOTS:
        raise LabNetError(f"manager {index}: 1..{MANAGER_SLOTS}")
    net = ipaddress.ip_network(subnet)
    address = net.network_address + 1 + index
    if address not in net or address == net.broadcast_address:
        raise LabNetError(f"manager {index} does not fit in {subnet}")
    return str(address)


def host_address(subnet: str, index: int) -> str:
    """Host N is at network + 10 + N (10.251.0.11 for h1 in 10.251.0.0/24)."""
    net = ipaddress.ip_network(subnet)
    address = net.network_address + 10 + index
    if address not in net or address == net.broadcast_address:
        raise LabNetError(f"host {index} does not fit in {subnet}")
    return str(address)


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def _no_ipv6(interface: str, netns: str | None = None) -> None:
    """Switch IPv6 off on an interface ("all"/"default" for the namespace). Written to /proc/sys directly, as the
    procps `sysctl` is not on every minimal machine; /proc/sys/net shows the namespace of whoever opens it."""
    key = f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6"
    if netns is None:
        if os.path.exists(key):  # a kernel without IPv6 has nothing to switch off
            Path(key).write_text("1\n")
        return
    run(["ip", "netns", "exec", netns, "sh", "-c", f"[ ! -e {key} ] || echo 1 > {key}"])


def create_bridge(bridge: str, subnet: str) -> None:
    net = ipaddress.ip_network(subnet)
    run(["ip", "link", "add", bridge, "type", "bridge"])
    _no_ipv6(bridge)
    run(["ip", "addr", "add", f"{bridge_address(subnet)}/{net.prefixlen}", "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])


def create_host_net(bridge: str, netns: str, veth: str, address: str, subnet: str) -> None:
    """A namespace with lo and eth0 (its end of the veth); the other end is a port of the bridge."""
    prefixlen = ipaddress.ip_network(subnet).prefixlen
    run(["ip", "netns", "add", netns])
    run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
    _no_ipv6(veth)
    _no_ipv6("all", netns)
    _no_ipv6("default", netns)
    _no_ipv6("eth0", netns)
    run(["ip", "link", "set", veth, "master", bridge, "up"])
    run(["ip", "-n", netns, "link", "set", "lo", "up"])
    run(["ip", "-n", netns, "addr", "add", f"{address}/{prefixlen}", "dev", "eth0"])
    run(["ip", "-n", netns, "link", "set", "eth0", "up"])


def set_link(veth: str, up: bool) -> None:
    """Cut (down) or restore (up) a host's cable: the bridge side of its veth."""
    run(["ip", "link", "set", veth, "up" if up else "down"])


def link_is_up(veth: str) -> bool:
    try:
        flags = int(Path("/sys/class/net", veth, "flags").read_text(), 16)
    except OSError:
        return False
    return bool(flags & 0x1)  # IFF_UP


def delete_host_net(netns: str, veth: str) -> None:
    if netns_exists(netns):
        run(["ip", "netns", "delete", netns], check=False)
    # Deleting the namespace takes its end of the veth and so the pair; this covers a half-made host.
    if link_exists(veth):
        run(["ip", "link", "delete", veth], check=False)


def delete_bridge(bridge: str) -> None:
    if link_exists(bridge):
        run(["ip", "link", "delete", bridge], check=False)


def netns_dir_mounted() -> bool:
    """`ip netns add` makes /run/netns a mount point the first time; the lab undoes that if it was the first."""
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == str(NETNS_DIR) for line in fh)


def undo_netns_dir(created_dir: bool) -> None:
    """Unmount /run/netns (and remove it if the lab created it) when no namespace is left in it."""
    if not NETNS_DIR.exists() or any(NETNS_DIR.iterdir()):
        return
    if netns_dir_mounted():
        run(["umount", str(NETNS_DIR)], check=False)
    if created_dir:
        NETNS_DIR.rmdir()
