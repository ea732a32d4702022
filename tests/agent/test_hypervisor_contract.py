"""One contract for every implementation of the hypervisor port: FakeHypervisor, libvirt's `test:///default`, and
a real `qemu:///system` served by a private libvirtd (kvmha.lab.testing.libvirtd).

Claims about a domain's state are checked against the backend itself: for libvirt through a second, independent
connection (`truth`), never only through the adapter under test.

What libvirt 9.0 really reports, as these tests pin it down:
- guest shutdown (the guest writes ACPI soft-off; see conftest.write_poweroff_boot_sector): event SHUTDOWN_GUEST,
  then STOPPED_SHUTDOWN; state SHUTOFF_SHUTDOWN.
- destroy: STOPPED_DESTROYED; state SHUTOFF_DESTROYED.
- QEMU killed with SIGKILL: event STOPPED_FAILED, but the state reason recorded is SHUTOFF_CRASHED; the snapshot
  therefore says CAUSE_CRASHED where the delta said CAUSE_FAILED. Both mean "died, not shut down".
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest

from kvmha.agent.hypervisor import Cause, DomainPower, ErrorKind, FakeHypervisor, Hypervisor, HypervisorError, Power
from kvmha.agent.libvirt_adapter import LibvirtHypervisor
from kvmha.lab.domain import BootDisk, domain_xml
from kvmha.lab.testing.libvirtd import PrivateLibvirtd
from tests.agent.conftest import new_uuid, write_poweroff_boot_sector

pytestmark = pytest.mark.timeout(120)


class Recorder:
    """A HypervisorListener that keeps everything it hears, with arrival times."""

    def __init__(self) -> None:
        self.domains: list[tuple[float, DomainPower]] = []
        self.connections: list[tuple[float, bool]] = []
        self._cond = threading.Condition()

    def domain_changed(self, domain: DomainPower) -> None:
        with self._cond:
            self.domains.append((time.monotonic(), domain))
            self._cond.notify_all()

    def connection_changed(self, connected: bool) -> None:
        with self._cond:
            self.connections.append((time.monotonic(), connected))
            self._cond.notify_all()

    def wait_domain(self, match: Callable[[DomainPower], bool], timeout_s: float = 10.0) -> tuple[float, DomainPower]:
        with self._cond:
            found = self._cond.wait_for(lambda: next((d for d in self.domains if match(d[1])), None), timeout_s)
        assert found is not None, f"no matching event in {timeout_s}s; got {[d.detail_text for _, d in self.domains]}"
        return found

    def wait_connection(self, connected: bool, after: float, timeout_s: float = 30.0) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: any(t >= after and c == connected for t, c in self.connections),
                                     timeout_s)
        assert ok, f"no connection_changed({connected}) in {timeout_s}s: {self.connections}"


@dataclass
class Backend:
    kind: str  # "fake" | "test" | "qemu"
    hv: Hypervisor
    recorder: Recorder
    domain_type: str = "qemu"
    uri: str = ""
    libvirtd: PrivateLibvirtd | None = None
    created: list[str] = field(default_factory=list)

    def xml(self, vm: str, boot_image: str | None = None) -> tuple[str, str]:
        name = f"ct-{self.kind}-{vm[:8]}"
        self.created.append(vm)
        disk = BootDisk(boot_image) if boot_image is not None else None
        return name, domain_xml(name, vm, domain_type=self.domain_type, disk=disk)

    def truth(self, vm: str) -> tuple[Power, int]:
        """The domain's power and raw reason, asked independently of the adapter."""
        if isinstance(self.hv, FakeHypervisor):
            return (Power.ON if vm in self.hv.running_uuids() else Power.OFF), -1
        conn = libvirt.open(self.uri)
        try:
            state, reason = conn.lookupByUUIDString(vm).state()
        finally:
            conn.close()
        return {1: Power.ON, 5: Power.OFF}.get(state, Power.UNKNOWN), reason


@pytest.fixture(params=["fake", "test", pytest.param("qemu", marks=pytest.mark.libvirt)])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    recorder = Recorder()
    if request.param == "fake":
        fake = FakeHypervisor()
        fake.subscribe(recorder)
        fake.open()
        yield Backend("fake", fake, recorder)
        return
    lv: PrivateLibvirtd | None = None
    uri = "test:///default"
    if request.param == "qemu":
        lv = request.getfixturevalue("private_libvirtd")
        uri = lv.uri
    adapter = LibvirtHypervisor(uri, reconnect_max_s=0.5)
    adapter.subscribe(recorder)
    adapter.open()
    assert adapter.wait_connected(15)
    b = Backend(request.param, adapter, recorder, lv.domain_type if lv else "qemu", uri, lv)
    try:
        yield b
    finally:
        adapter.close()
        conn = libvirt.open(uri)
        for vm in b.created:
            try:
                dom = conn.lookupByUUIDString(vm)
            except libvirt.libvirtError:
                continue
            with contextlib.suppress(libvirt.libvirtError):  # it may stop by itself meanwhile
                dom.destroy()
            dom.undefine()
        conn.close()


def test_snapshot_lists_started_domain(backend: Backend) -> None:
    vm = new_uuid()
    name, xml = backend.xml(vm)
    outcome = backend.hv.start_vm(xml)
    assert outcome.uuid == vm and not outcome.already_running
    mine = [d for d in backend.hv.list_domains() if d.uuid == vm]
    assert len(mine) == 1 and mine[0].name == name and mine[0].power is Power.ON
    assert backend.truth(vm)[0] is Power.ON
    # QEMU domains send RESUMED (ON, cause OTHER) just before STARTED_BOOTED: wait for the latter.
    _, started = backend.recorder.wait_domain(lambda d: d.uuid == vm and d.cause is Cause.BOOTED)
    assert started.power is Power.ON and started.detail_text in ("STARTED_BOOTED", "ON_BOOTED")


def test_second_start_is_already_running_and_one_copy(backend: Backend) -> None:
    vm = new_uuid()
    _, xml = backend.xml(vm)
    backend.hv.start_vm(xml)
    assert backend.hv.start_vm(xml).already_running
    assert [d.uuid for d in backend.hv.list_domains()].count(vm) == 1
    assert backend.truth(vm)[0] is Power.ON


def test_destroy_reports_destroyed(backend: Backend) -> None:
    vm = new_uuid()
    _, xml = backend.xml(vm)
    backend.hv.start_vm(xml)
    backend.hv.destroy_vm(vm)
    _, event = backend.recorder.wait_domain(lambda d: d.uuid == vm and d.power is Power.OFF)
    assert event.cause is Cause.DESTROYED
    assert backend.truth(vm)[0] is Power.OFF
    snap = next(d for d in backend.hv.list_domains() if d.uuid == vm)
    assert (snap.power, snap.cause) == (Power.OFF, Cause.DESTROYED)
    backend.hv.destroy_vm(vm)  # already off: not an error


def test_stop_falls_back_to_destroy_when_the_guest_ignores_acpi(backend: Backend) -> None:
    vm = new_uuid()
    _, xml = backend.xml(vm)
    backend.hv.start_vm(xml)
    if isinstance(backend.hv, FakeHypervisor):
        backend.hv.ignore_shutdown = True
    began = time.monotonic()
    backend.hv.stop_vm(vm, timeout_s=1.0)
    assert backend.truth(vm)[0] is Power.OFF
    _, event = backend.recorder.wait_domain(lambda d: d.uuid == vm and d.power is Power.OFF)
    if backend.kind == "test":
        # libvirt's test driver obeys the shutdown request at once: a clean guest shutdown.
        assert event.cause is Cause.GUEST_SHUTDOWN
    else:
        # No OS in the guest answers ACPI: after the timeout the agent destroys it.
        assert event.cause is Cause.DESTROYED and time.monotonic() - began >= 0.9


def test_guest_shutdown_is_told_apart(backend: Backend, tmp_path: Path) -> None:
    vm = new_uuid()
    if backend.kind == "qemu":
        _, xml = backend.xml(vm, write_poweroff_boot_sector(str(tmp_path / "poweroff.img")))
        backend.hv.start_vm(xml)  # boots, and the boot sector powers the guest off by itself
    else:
        _, xml = backend.xml(vm)
        backend.hv.start_vm(xml)
        backend.hv.stop_vm(vm, timeout_s=5)  # fake and test driver: the guest obeys ACPI
    _, event = backend.recorder.wait_domain(lambda d: d.uuid == vm and d.power is Power.OFF, timeout_s=30)
    assert event.cause is Cause.GUEST_SHUTDOWN
    power, reason = backend.truth(vm)
    assert power is Power.OFF
    if backend.kind != "fake":
        assert event.detail_text == "STOPPED_SHUTDOWN"
        assert reason == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN


def test_qemu_killed_is_a_failure_not_a_shutdown(backend: Backend) -> None:
    vm = new_uuid()
    name, xml = backend.xml(vm)
    backend.hv.start_vm(xml)
    if backend.kind == "test":
        pytest.skip("libvirt's test driver has no QEMU process to kill")
    if isinstance(backend.hv, FakeHypervisor):
        killed_at = time.monotonic()
        backend.hv.crash(vm)
    else:
        assert backend.libvirtd is not None
        pid = backend.libvirtd.qemu_pid(name)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
    at, event = backend.recorder.wait_domain(lambda d: d.uuid == vm and d.power is Power.OFF)
    assert event.cause is Cause.FAILED
    assert at - killed_at < 1.0, f"event {at - killed_at:.3f}s after the kill"
    power, reason = backend.truth(vm)
    assert power is Power.OFF
    if backend.kind == "qemu":
        assert event.detail_text == "STOPPED_FAILED"
        assert reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED  # what libvirt 9.0 records for a SIGKILLed QEMU
        snap = next(d for d in backend.hv.list_domains() if d.uuid == vm)
        assert (snap.power, snap.cause) == (Power.OFF, Cause.CRASHED)


def test_errors_are_typed_and_carry_the_message(backend: Backend) -> None:
    with pytest.raises(HypervisorError) as missing:
        backend.hv.destroy_vm(new_uuid())
    assert missing.value.kind is ErrorKind.NOT_FOUND and missing.value.message
    with pytest.raises(HypervisorError) as bad:
        backend.hv.start_vm(f"<domain type='{backend.domain_type}'><uuid>{new_uuid()}</uuid></domain>")
    assert bad.value.kind is ErrorKind.LIBVIRT and "name" in bad.value.message.lower()


def test_capacity_and_versions(backend: Backend) -> None:
    cap = backend.hv.capacity()
    assert cap.cpus > 0 and cap.memory_mib > 0 and 0 <= cap.free_memory_mib <= cap.memory_mib
    assert backend.hv.versions().libvirt.count(".") == 2


def test_losing_the_daemon_is_reported_and_healed(backend: Backend) -> None:
    vm = new_uuid()
    _, xml = backend.xml(vm)
    backend.hv.start_vm(xml)
    began = time.monotonic()
    if isinstance(backend.hv, FakeHypervisor):
        backend.hv.set_connected(False)
        with pytest.raises(HypervisorError) as down:
            backend.hv.list_domains()
        assert down.value.kind is ErrorKind.UNAVAILABLE
        backend.hv.set_connected(True)
    elif backend.kind == "test":
        pytest.skip("test:///default lives in this process: there is no daemon to lose")
    else:
        assert backend.libvirtd is not None
        backend.libvirtd.stop_libvirtd()
        backend.recorder.wait_connection(False, began, timeout_s=15)
        assert not backend.hv.is_connected()
        with pytest.raises(HypervisorError) as down:
            backend.hv.list_domains()
        assert down.value.kind is ErrorKind.UNAVAILABLE
        backend.libvirtd.start_libvirtd()
    backend.recorder.wait_connection(True, began, timeout_s=30)
    assert backend.hv.is_connected()
    mine = [d for d in backend.hv.list_domains() if d.uuid == vm]
    assert [d.power for d in mine] == [Power.ON]  # the VM kept running while the daemon was away
    assert backend.truth(vm)[0] is Power.ON


@pytest.mark.libvirt
def test_hung_libvirtd_is_found_by_keepalive(private_libvirtd: PrivateLibvirtd) -> None:
    """A libvirtd that stops answering (SIGSTOP) sends no EOF: only keepalive notices, after interval x (count+1)."""
    recorder = Recorder()
    adapter = LibvirtHypervisor(private_libvirtd.uri, keepalive_interval_s=1, keepalive_count=2, reconnect_max_s=0.5)
    adapter.subscribe(recorder)
    adapter.open()
    pid = private_libvirtd.libvirtd_pid
    assert pid is not None
    try:
        assert adapter.wait_connected(15)
        began = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            recorder.wait_connection(False, began, timeout_s=10)
            assert time.monotonic() - began < 6
            assert not adapter.is_connected()
        finally:
            os.kill(pid, signal.SIGCONT)
        recorder.wait_connection(True, began, timeout_s=30)
        adapter.list_domains()
    finally:
        adapter.close()
