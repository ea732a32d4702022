"""The duplicate sampler's judgment of a VM with QEMUs on several hosts (no lab needed: a stand-in lab answers
/proc and virsh domstate): a migration's overlap is allowed, two running copies are not."""

from __future__ import annotations

import subprocess
from typing import cast

import pytest

from kvmha.lab.harness import DuplicateWatch
from kvmha.lab.lab import Lab


class StandIn:
    """running_vms() from a fixed map; `virsh domstate` answers from a script of reads per host."""

    def __init__(self, qemus: list[dict[str, dict[str, int]]], states: dict[str, list[str]]) -> None:
        self.qemus, self.states = qemus, {host: iter(seq) for host, seq in states.items()}

    def running_vms(self) -> dict[str, dict[str, int]]:
        """The next /proc pass (the last one again once the script is used up)."""
        return self.qemus.pop(0) if len(self.qemus) > 1 else self.qemus[0]

    def exec(self, host: str, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        state = next(self.states[host])
        if state == "error":
            raise RuntimeError("the host is gone mid-read")
        if state == "gone":
            return subprocess.CompletedProcess(argv, 1, "", "error: failed to get domain 'vm1'\n")
        if state == "no answer":
            return subprocess.CompletedProcess(argv, 1, "", "error: failed to connect to the hypervisor\n")
        return subprocess.CompletedProcess(argv, 0, state + "\n", "")


def _sample(qemus: dict[str, dict[str, int]] | list[dict[str, dict[str, int]]],
            states: dict[str, list[str]]) -> DuplicateWatch:
    watch = DuplicateWatch(cast(Lab, StandIn(qemus if isinstance(qemus, list) else [qemus], states)))
    original = watch._stop.wait  # one pass of the sampling loop, in this thread

    def once(timeout: float | None = None) -> bool:
        watch._stop.set()
        return original(0)

    watch._stop.wait = once  # type: ignore[method-assign]
    watch._run()
    return watch


TWO = {"h1": {"vm1": 10}, "h2": {"vm1": 20}}


@pytest.mark.parametrize(
    ("states", "duplicate"),
    [
        ({"h1": ["running"], "h2": ["paused"]}, False),  # precopy: the incoming copy is paused
        ({"h1": ["paused"], "h2": ["running"]}, False),  # just after the switchover
        ({"h1": ["running", "paused"], "h2": ["running", "running"]}, False),  # a read across the switchover
        ({"h1": ["running", "running"], "h2": ["running", "running"]}, True),  # two running copies
        ({"h1": ["running", "running"], "h2": ["error", "error"]}, True),  # no answer: nothing proves it paused
        ({"h1": ["running", "running"], "h2": ["no answer", "no answer"]}, True),
        ({"h1": ["gone"], "h2": ["running"]}, False),  # the source's QEMU being torn down after the migration
    ],
)
def test_a_migration_overlap_is_allowed_two_running_copies_are_not(
    states: dict[str, list[str]], duplicate: bool
) -> None:
    watch = _sample(TWO, states)
    assert watch.samples == 1
    assert bool(watch.duplicates) is duplicate, watch.duplicates
    assert watch.overlaps == (0 if duplicate else 1)


def test_a_host_powered_off_mid_read_is_judged_on_its_qemu_being_gone() -> None:
    """Its libvirtd no longer answers (counted as running), but its QEMU is gone a moment later: no duplicate."""
    watch = _sample([TWO, {"h1": {"vm1": 10}, "h2": {}}], {"h1": ["running", "running"], "h2": ["no answer"]})
    assert not watch.duplicates and watch.overlaps == 1


def test_one_qemu_per_vm_asks_libvirt_nothing() -> None:
    watch = _sample({"h1": {"vm1": 1}, "h2": {"vm2": 2}}, {})  # any virsh call would raise KeyError in StandIn
    assert watch.samples == 1 and not watch.duplicates and watch.overlaps == 0
