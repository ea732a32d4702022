"""kvmha.lab: several real libvirt/KVM hosts on one machine, powered through IPMI BMC simulators (docs/lab.md)."""

from kvmha.lab.lab import DEFAULT_SUBNET, Lab
from kvmha.lab.state import DEFAULT_STATE_DIR, HostSpec, LabError

__all__ = ["DEFAULT_STATE_DIR", "DEFAULT_SUBNET", "HostSpec", "Lab", "LabError"]
