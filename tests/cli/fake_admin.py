"""A fake AdminService for the CLI tests: in-memory hosts, VMs, HA work, events and configuration.

It answers like the contract in admin.proto says the manager does (refs by id, uuid or name; NOT_FOUND,
INVALID_ARGUMENT, FAILED_PRECONDITION with an operator-facing message) and records every request, so a test can
assert what the CLI sent as well as what it printed. Runs a real gRPC server on 127.0.0.1.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from kvmha.proto.metadata import NOT_ACTIVE_KEY
from kvmha.proto.v1 import admin_pb2 as pb
from kvmha.proto.v1 import admin_pb2_grpc

NOW = time.time()
INT_CONFIG = {"ping.interval_s", "ping.timeout_s"}


class Named(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def uuid(self) -> str: ...
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=Named)


def _hosts() -> list[pb.HostInfo]:
    return [
        pb.HostInfo(
            id=1, uuid="11111111-aaaa-4000-8000-000000000001", name="h1", address="10.0.0.1", status="Up",
            resource_state="Enabled", role="Routing", last_ping_at=NOW - 2, cpus=16, memory_mib=65536, vms_running=1,
            connected=True, manager_id="m1", agent_version="0.1.0", watchdog_armed=True, watchdog_timeout_s=20.0,
            lease_manager="lockd",
        ),
        pb.HostInfo(
            id=2, uuid="11111111-aaaa-4000-8000-000000000002", name="h2", address="10.0.0.2", status="Down",
            resource_state="Enabled", role="Routing", last_ping_at=NOW - 300, cpus=8, memory_mib=32768,
            has_bmc=True, bmc_address="10.0.1.2:623",
        ),
        pb.HostInfo(
            id=3, uuid="11111111-aaaa-4000-8000-000000000003", name="h3", address="10.0.0.3", status="Fencing",
            resource_state="Enabled", role="Routing", cpus=8, memory_mib=32768,
            watchdog_detail="kvmha-watchdog unreachable",
        ),
        pb.HostInfo(
            id=4, uuid="11111111-aaaa-4000-8000-000000000004", name="h4", address="10.0.0.4", status="Alert",
            resource_state="Enabled", role="Routing", last_ping_at=NOW - 120, cpus=8, memory_mib=32768,
        ),
    ]  # fmt: skip


def _vms() -> list[pb.VmInfo]:
    return [
        pb.VmInfo(
            id=7, uuid="22222222-bbbb-4000-8000-000000000007", name="web1", state="Running", power_state="PowerOn",
            power_state_updated_at=NOW - 5, host="h1", last_host="h1", ha_enabled=True, restart_priority=10,
            anti_affinity_group="web", memory_mib=1024, vcpus=2, update_count=3,
        ),
        pb.VmInfo(
            id=8, uuid="22222222-bbbb-4000-8000-000000000008", name="db1", state="Stopped", power_state="PowerOff",
            last_host="h2", memory_mib=4096, vcpus=4,
        ),
        pb.VmInfo(
            id=9, uuid="22222222-bbbb-4000-8000-000000000009", name="stray", state="Unmanaged",
            power_state="PowerOn", host="h1",
        ),
    ]  # fmt: skip


def _work() -> list[pb.HaWorkInfo]:
    return [
        pb.HaWorkInfo(
            id=12, vm="web2", vm_uuid="22222222-bbbb-4000-8000-000000000010", type="HA", step="Fencing", host="h3",
            tried=1, time_to_try_at=NOW + 30, reason="host h3 stopped pinging", created_at=NOW - 40,
            updated_at=NOW - 10, taken_by="m1",
        ),
        pb.HaWorkInfo(
            id=11, vm="web1", type="HA", step="Done", host="h2", tried=1, reason="restarted on h1",
            created_at=NOW - 3600, updated_at=NOW - 3500,
        ),
    ]  # fmt: skip


def _events() -> list[pb.EventInfo]:
    return [
        pb.EventInfo(id=1, at=NOW - 60, severity="info", subject="host:1", kind="HostUp", message="h1 is Up"),
        pb.EventInfo(id=2, at=NOW - 50, severity="alert", subject="host:2", kind="HostDown", message="h2 is Down"),
        pb.EventInfo(id=3, at=NOW - 40, severity="warning", subject="vm:7", kind="HaScheduled", message="web1 HA"),
    ]


def _config() -> list[pb.ConfigItem]:
    return [
        pb.ConfigItem(
            name="ping.interval_s", value="2", default_value="2", description="agent ping period", scope="global"
        ),
        pb.ConfigItem(
            name="ping.timeout_s", value="10", default_value="6", description="host behind after", scope="global"
        ),
    ]


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self) -> None:
        # The sample times are relative to now: a fake made minutes after this module was imported (the whole suite
        # in one process) must still show "2 s ago".
        global NOW
        NOW = time.time()
        self.requests: list[tuple[str, Message]] = []
        self.hosts, self.vms, self.work = _hosts(), _vms(), _work()
        self.events, self.config = _events(), _config()
        self.delay_s = 0.0  # > 0 makes every unary call slow, to test the CLI's deadline
        self.migration_progress: list[int] = [25, 60, 95]
        self.migration_fails = False
        self.changed = threading.Condition()
        self.closed = False
        self.close_status: grpc.StatusCode | None = None
        self.standby_of: str | None = None  # set: a standby manager that refuses changes, naming this lease holder

    # --- test controls ---

    def sent(self, method: str) -> list[Message]:
        return [request for name, request in self.requests if name == method]

    def add_event(self, kind: str, message: str, subject: str = "manager", severity: str = "info") -> pb.EventInfo:
        with self.changed:
            event = pb.EventInfo(
                id=self.events[-1].id + 1, at=time.time(), severity=severity, subject=subject, kind=kind,
                message=message,
            )  # fmt: skip
            self.events.append(event)
            self.changed.notify_all()
        return event

    def close_streams(self, status: grpc.StatusCode | None = None) -> None:
        """End the follow streams once drained: normally, or with `status` (a manager going away)."""
        with self.changed:
            self.closed, self.close_status = True, status
            self.changed.notify_all()

    # --- helpers ---

    def _record(self, method: str, request: Message) -> None:
        self.requests.append((method, request))
        if self.delay_s:
            time.sleep(self.delay_s)

    @staticmethod
    def _find(items: Sequence[N], ref: str, what: str, context: grpc.ServicerContext) -> N:
        for item in items:
            if ref in (str(item.id), item.uuid, item.name):
                return item
        context.abort(grpc.StatusCode.NOT_FOUND, f"no {what} '{ref}'")
        raise AssertionError("abort raises")

    # --- hosts ---

    def ListHosts(self, request: pb.ListHostsRequest, context: grpc.ServicerContext) -> pb.ListHostsResponse:
        self._record("ListHosts", request)
        after = int(request.page_token or 0)
        page = [h for h in self.hosts if h.id > after][:request.page_size or None]
        full = request.page_size and len(page) == request.page_size
        return pb.ListHostsResponse(hosts=page, next_page_token=str(page[-1].id) if full else "")

    def GetHost(self, request: pb.Ref, context: grpc.ServicerContext) -> pb.HostInfo:
        self._record("GetHost", request)
        return self._find(self.hosts, request.ref, "host", context)

    def SetMaintenance(self, request: pb.SetMaintenanceRequest, context: grpc.ServicerContext) -> pb.HostInfo:
        self._record("SetMaintenance", request)
        host = self._find(self.hosts, request.host, "host", context)
        host.resource_state = "PrepareForMaintenance" if request.on else "Enabled"
        return host

    def SetHostBmc(self, request: pb.SetHostBmcRequest, context: grpc.ServicerContext) -> pb.HostInfo:
        self._record("SetHostBmc", request)
        host = self._find(self.hosts, request.host, "host", context)
        host.has_bmc = not request.clear
        host.bmc_address = "" if request.clear else f"{request.address}:{request.port}"
        return host

    def ConfirmHostDown(self, request: pb.ConfirmHostDownRequest, context: grpc.ServicerContext) -> pb.HostInfo:
        self._record("ConfirmHostDown", request)
        host = self._find(self.hosts, request.host, "host", context)
        if host.status not in ("Investigating", "Alert"):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"host {host.name} is {host.status}")
        host.status = "Down"
        return host

    def SetHostEnabled(self, request: pb.SetHostEnabledRequest, context: grpc.ServicerContext) -> pb.HostInfo:
        self._record("SetHostEnabled", request)
        host = self._find(self.hosts, request.host, "host", context)
        host.resource_state = "Enabled" if request.enabled else "Disabled"
        return host

    def RemoveHost(self, request: pb.Ref, context: grpc.ServicerContext) -> pb.HostInfo:
        self._record("RemoveHost", request)
        host = self._find(self.hosts, request.ref, "host", context)
        busy = [vm.name for vm in self.vms if vm.host == host.name and vm.state != "Stopped"]
        if busy:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"host {host.name} still runs {len(busy)} VMs")
        host.status = "Removed"
        return host

    def AddHost(self, request: pb.AddHostRequest, context: grpc.ServicerContext) -> pb.HostInfo:
        self._record("AddHost", request)
        host = pb.HostInfo(id=max((h.id for h in self.hosts), default=0) + 1, uuid=request.uuid, name=request.name,
                           address=request.address, status="Connecting", resource_state="Enabled")
        self.hosts.append(host)
        return host

    # --- VMs ---

    def CancelMigration(self, request: pb.Ref, context: grpc.ServicerContext) -> pb.VmInfo:
        self._record("CancelMigration", request)
        return self._find(self.vms, request.ref, "VM", context)

    def MigrateVm(self, request: pb.MigrateVmRequest, context: grpc.ServicerContext) -> pb.VmInfo:
        """Records the request and plays the manager's events of the migration (the test may add more)."""
        self._record("MigrateVm", request)
        vm = self._find(self.vms, request.vm, "VM", context)
        if vm.state != "Running":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"VM {vm.name} is {vm.state}")
        target = request.to_host or "h3"
        subject = f"vm:{vm.id}"
        self.add_event("vm.migrating", f"migrating from {vm.host} to {target} (operator migrate)", subject)
        for share in self.migration_progress:
            self.add_event("vm.migration.progress", f"{share}% of memory copied", subject)
        if self.migration_fails:
            self.add_event("vm.migration.failed", f"stays on {vm.host}: migration failed: boom", subject, "warning")
        else:
            self.add_event("vm.migrated", f"migrated from {vm.host} to {target} in 3.2 s", subject)
        return vm  # (the fixture is shared by the module: the record stays Running)

    def ListVms(self, request: pb.ListVmsRequest, context: grpc.ServicerContext) -> pb.ListVmsResponse:
        self._record("ListVms", request)
        if not request.host:
            return pb.ListVmsResponse(vms=self.vms)
        host = self._find(self.hosts, request.host, "host", context)
        return pb.ListVmsResponse(vms=[vm for vm in self.vms if vm.host == host.name])

    def GetVm(self, request: pb.Ref, context: grpc.ServicerContext) -> pb.VmInfo:
        self._record("GetVm", request)
        return self._find(self.vms, request.ref, "VM", context)

    def CreateVm(self, request: pb.CreateVmRequest, context: grpc.ServicerContext) -> pb.VmInfo:
        self._record("CreateVm", request)
        if "<domain" not in request.domain_xml:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "domain XML: the root element is not <domain>")
        name = request.name or request.domain_xml.split("<name>")[1].split("</name>")[0]
        host = self._find(self.hosts, request.host, "host", context).name if request.host else ""
        vm = pb.VmInfo(
            id=self.vms[-1].id + 1, uuid=f"33333333-cccc-4000-8000-{len(self.vms):012d}", name=name,
            state="Starting" if request.start else "Stopped", power_state="PowerUnknown",
            host=host if request.start else "", ha_enabled=request.ha_enabled,
            restart_priority=request.restart_priority, anti_affinity_group=request.anti_affinity_group,
        )  # fmt: skip
        self.vms.append(vm)
        return vm

    def _refuse_if_standby(self, context: grpc.ServicerContext) -> None:
        """As manager/adapters/admin.py does on a standby: FAILED_PRECONDITION, the holder in a trailer."""
        if self.standby_of is not None:
            context.set_trailing_metadata(((NOT_ACTIVE_KEY, self.standby_of),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this manager is a standby; the lease is held by {self.standby_of}")

    def StartVm(self, request: pb.Ref, context: grpc.ServicerContext) -> pb.VmInfo:
        self._record("StartVm", request)
        self._refuse_if_standby(context)
        vm = self._find(self.vms, request.ref, "VM", context)
        vm.state, vm.host = "Starting", vm.host or "h1"
        return vm

    def StopVm(self, request: pb.Ref, context: grpc.ServicerContext) -> pb.VmInfo:
        self._record("StopVm", request)
        vm = self._find(self.vms, request.ref, "VM", context)
        vm.state = "Stopping"
        return vm

    def DeleteVm(self, request: pb.Ref, context: grpc.ServicerContext) -> pb.DeleteVmResponse:
        self._record("DeleteVm", request)
        vm = self._find(self.vms, request.ref, "VM", context)
        if vm.state != "Stopped":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"VM {vm.name} is {vm.state}; stop it first")
        self.vms.remove(vm)
        return pb.DeleteVmResponse(id=vm.id)

    def SetVmHa(self, request: pb.SetVmHaRequest, context: grpc.ServicerContext) -> pb.VmInfo:
        self._record("SetVmHa", request)
        vm = self._find(self.vms, request.vm, "VM", context)
        vm.ha_enabled = request.enabled
        return vm

    # --- HA work, events, configuration ---

    def ListHaWork(self, request: pb.ListHaWorkRequest, context: grpc.ServicerContext) -> pb.ListHaWorkResponse:
        self._record("ListHaWork", request)
        done = {"Done", "Error", "Cancelled"}
        return pb.ListHaWorkResponse(items=[w for w in self.work if not (request.active_only and w.step in done)])

    def PlanFailure(self, request: pb.PlanFailureRequest, context: grpc.ServicerContext) -> pb.PlanFailureResponse:
        self._record("PlanFailure", request)
        reply = pb.PlanFailureResponse(failed=list(request.fail) or ["h1"], admission_host_failures=1)
        reply.vms.add(vm="web", from_host=reply.failed[0], ha=True, target="h2", order=1, eta_s=2.4)
        reply.vms.add(vm="db", from_host=reply.failed[0], ha=True, reason="no host fits 8192 MiB / 2 vCPUs "
                      "(not enough free memory: h2)", order=2)
        reply.vms.add(vm="scratch", from_host=reply.failed[0], ha=False, reason="HA off: stays Stopped")
        reply.hosts.add(host="h2", free_memory_mib=3072, reserve_mib=1024, free_vcpus=12, inventory_reported=True)
        return reply

    def _matching(self, request: pb.ListEventsRequest, after_id: int) -> list[pb.EventInfo]:
        return [e for e in self.events if e.id > after_id and (not request.subject or e.subject == request.subject)]

    def ListEvents(self, request: pb.ListEventsRequest, context: grpc.ServicerContext) -> pb.ListEventsResponse:
        self._record("ListEvents", request)
        return pb.ListEventsResponse(events=self._matching(request, request.after_id)[: request.limit or 100])

    def FollowEvents(self, request: pb.ListEventsRequest, context: grpc.ServicerContext) -> Iterator[pb.EventInfo]:
        self.requests.append(("FollowEvents", request))
        last = request.after_id
        while context.is_active():
            with self.changed:
                new = self._matching(request, last)
                if not new and self.closed:  # closing drains what was recorded first
                    if self.close_status is not None:
                        context.abort(self.close_status, "manager shutting down")
                    return
                if not new:
                    self.changed.wait(0.05)  # short, so a cancelled stream is noticed quickly
                    continue
            for event in new:
                yield event
                last = event.id

    def ListConfig(self, request: pb.ListConfigRequest, context: grpc.ServicerContext) -> pb.ListConfigResponse:
        self._record("ListConfig", request)
        return pb.ListConfigResponse(items=self.config)

    def ListManagers(self, request: pb.ListManagersRequest,
                     context: grpc.ServicerContext) -> pb.ListManagersResponse:
        self._record("ListManagers", request)
        return pb.ListManagersResponse(managers=[
            pb.ManagerInfo(id="mgr-a", address="10.0.0.251:50051", version="0.1.0", started_at=NOW - 600,
                           last_heartbeat_at=NOW - 0.4, hosts_owned=3, holds_lease=True),
            pb.ManagerInfo(id="mgr-b", address="10.0.0.252:50051", version="0.1.0", started_at=NOW - 60,
                           last_heartbeat_at=NOW - 0.7, hosts_owned=0, answering=True),
        ], lease_holder="mgr-a", lease_epoch=4, lease_expires_in_s=5.2)

    def SetConfig(self, request: pb.SetConfigRequest, context: grpc.ServicerContext) -> pb.ConfigItem:
        self._record("SetConfig", request)
        item = next((c for c in self.config if c.name == request.name), None)
        if item is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no configuration item '{request.name}'")
            raise AssertionError("abort raises")
        if request.name in INT_CONFIG and not request.value.isdigit():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.name}: '{request.value}' is not an integer")
        item.value = request.value
        return item


def serve(fake: FakeAdmin, credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    admin_pb2_grpc.add_AdminServiceServicer_to_server(fake, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, f"127.0.0.1:{port}"
