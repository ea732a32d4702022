"""The AdminService gRPC servicer behind the operator CLI.

Listings read the database (the driver writes every change there before it acts, so it is current). Changes run
through `ManagerService.run`, in order with the agents' facts, and reach the core as operator facts; the RPC answers
once the core's reaction is recorded. Errors are gRPC statuses with a message for the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid as uuid_module
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc

from kvmha.manager.adapters.db_models import Host, VmInstance
from kvmha.manager.adapters.repository import ConfigRow, EventRow, UnitOfWork
from kvmha.manager.core import facts
from kvmha.manager.core.config import ConfigError, CoreConfig
from kvmha.manager.core.model import HaWorkRecord, HostId, PowerState, VmId, VmRecord, VmState, VmUuid
from kvmha.manager.core.powersync import UNMANAGED_ID_BASE
from kvmha.manager.service import ManagerService
from kvmha.proto.v1 import admin_pb2 as pb
from kvmha.proto.v1 import admin_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
MAX_XML_BYTES = 1 << 20
ACTIVE_VM_STATES = (VmState.RUNNING, VmState.STARTING, VmState.STOPPING, VmState.MIGRATING)


class AdminError(Exception):
    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status = status


def _fail(status: grpc.StatusCode, message: str) -> NoReturn:
    raise AdminError(status, message)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, service: ManagerService) -> None:
        self._service = service
        self._events_recorded = asyncio.Event()
        service.event_listeners.append(self._notify)

    def _notify(self) -> None:
        # Wake every follower waiting on the current Event; later waiters get a fresh one.
        self._events_recorded.set()
        self._events_recorded = asyncio.Event()

    async def _guard(self, context: Context, call: Any) -> Any:
        try:
            return await call
        except AdminError as error:
            await context.abort(error.status, str(error))

    # ------------------------------------------------------------------ hosts

    def _live(self) -> tuple[set[HostId], dict[int, float]]:
        """What only the driver's memory knows: the hosts with an open stream, and each host's last ping (the core
        does not write every ping to the database, so the row's last_ping_at is only as new as its last save)."""
        core = self._service.core
        pings = {int(h.id): h.last_ping_at for h in core.hosts.values() if h.last_ping_at is not None} if core else {}
        return self._service.links.hosts(), pings

    async def ListHosts(self, request: pb.ListHostsRequest, context: Context) -> pb.ListHostsResponse:
        connected, pings = self._live()

        def listing(uow: UnitOfWork) -> pb.ListHostsResponse:
            running = _running_by_host(uow)
            return pb.ListHostsResponse(hosts=[_host_info(h, connected, pings, running) for h in uow.hosts.rows()])

        return await self._service.read(listing)

    async def GetHost(self, request: pb.Ref, context: Context) -> pb.HostInfo:
        return await self._guard(context, self._host_info(request.ref))  # type: ignore[no-any-return]

    async def _host_info(self, ref: str) -> pb.HostInfo:
        connected, pings = self._live()
        return await self._service.read(lambda uow: _host_info(_host(uow, ref), connected, pings,
                                                               _running_by_host(uow)))

    async def SetMaintenance(self, request: pb.SetMaintenanceRequest, context: Context) -> pb.HostInfo:
        async def change() -> pb.HostInfo:
            host_id = await self._service.run(lambda uow: HostId(_host(uow, request.host).id),
                                              lambda hid: [facts.HostMaintenanceChanged(host_id=hid, on=request.on)])
            return await self._host_info(str(host_id))

        return await self._guard(context, change())  # type: ignore[no-any-return]

    async def SetHostBmc(self, request: pb.SetHostBmcRequest, context: Context) -> pb.HostInfo:
        def store(uow: UnitOfWork) -> tuple[HostId, bool]:
            row = _host(uow, request.host)
            if request.clear:
                row.bmc_address = row.bmc_port = row.bmc_user = row.bmc_password = None
            else:
                if not request.address or not 0 < request.port < 65536:
                    _fail(grpc.StatusCode.INVALID_ARGUMENT, "a BMC needs an address and a port between 1 and 65535")
                row.bmc_address, row.bmc_port = request.address, request.port
                row.bmc_user, row.bmc_password = request.user, request.password
            uow.commit()
            return HostId(row.id), not request.clear

        async def change() -> pb.HostInfo:
            host_id, _ = await self._service.run(
                store, lambda r: [facts.HostBmcChanged(host_id=r[0], has_bmc=r[1])])
            return await self._host_info(str(host_id))

        return await self._guard(context, change())  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ VMs

    async def ListVms(self, request: pb.ListVmsRequest, context: Context) -> pb.ListVmsResponse:
        def listing(uow: UnitOfWork) -> pb.ListVmsResponse:
            host_id = _host(uow, request.host).id if request.host else None
            names = {h.id: h.name for h in uow.hosts.rows()}
            return pb.ListVmsResponse(vms=[_vm_info(v, names) for v in uow.vms.rows(host_id)])

        return await self._guard(context, self._service.read(listing))  # type: ignore[no-any-return]

    async def GetVm(self, request: pb.Ref, context: Context) -> pb.VmInfo:
        return await self._guard(context, self._vm_info(request.ref))  # type: ignore[no-any-return]

    async def _vm_info(self, ref: str) -> pb.VmInfo:
        def info(uow: UnitOfWork) -> pb.VmInfo:
            return _vm_info(_vm(uow, ref), {h.id: h.name for h in uow.hosts.rows()})

        return await self._service.read(info)

    async def CreateVm(self, request: pb.CreateVmRequest, context: Context) -> pb.VmInfo:
        async def create() -> pb.VmInfo:
            if request.host:
                _fail(grpc.StatusCode.INVALID_ARGUMENT, "choosing the host is not supported yet: placement picks it")
            record = _vm_from_xml(request)
            registered = await self._service.run(lambda uow: self._register(uow, record),
                                                 lambda r: _created(r, start=request.start))
            return await self._vm_info(str(registered.id))

        return await self._guard(context, create())  # type: ignore[no-any-return]

    def _register(self, uow: UnitOfWork, record: VmRecord) -> VmRecord:
        same_name = uow.vms.find(record.name)
        if same_name is not None and same_name.uuid != record.uuid and same_name.name == record.name:
            _fail(grpc.StatusCode.ALREADY_EXISTS, f"a VM named {record.name} is already registered "
                                                  f"(uuid {same_name.uuid}); names must be unique")
        existing = uow.vms.by_uuid(record.uuid)
        if existing is not None and existing.state is not VmState.UNMANAGED:
            _fail(grpc.StatusCode.ALREADY_EXISTS, f"a VM with uuid {record.uuid} is already registered "
                                                  f"({existing.name})")
        if existing is not None:  # adopt a domain the agents reported: it keeps its host and power state
            record.id, record.host_id, record.power_state = VmId(existing.id), _opt_host(existing.host_id), \
                existing.power_state
            record.state = VmState.RUNNING if existing.power_state is PowerState.POWER_ON else VmState.STOPPED
        else:
            # Registered VMs are numbered below UNMANAGED_ID_BASE; the core numbers discovered domains above it.
            core = self._service.core
            known = [vm.id for vm in core.vms if vm.id < UNMANAGED_ID_BASE] if core is not None else []
            record.id = VmId(max(uow.vms.max_id(below=UNMANAGED_ID_BASE), *known, 0) + 1)
        return record

    async def StartVm(self, request: pb.Ref, context: Context) -> pb.VmInfo:
        return await self._guard(context, self._vm_fact(request.ref, lambda v: facts.VmStartRequested(vm_id=v)))  # type: ignore[no-any-return]

    async def StopVm(self, request: pb.Ref, context: Context) -> pb.VmInfo:
        return await self._guard(context, self._vm_fact(request.ref, lambda v: facts.VmStopRequested(vm_id=v)))  # type: ignore[no-any-return]

    async def SetVmHa(self, request: pb.SetVmHaRequest, context: Context) -> pb.VmInfo:
        return await self._guard(context, self._vm_fact(  # type: ignore[no-any-return]
            request.vm, lambda v: facts.VmHaChanged(vm_id=v, enabled=request.enabled)))

    async def _vm_fact(self, ref: str, make: Any) -> pb.VmInfo:
        def find(uow: UnitOfWork) -> VmId:
            row = _vm(uow, ref)
            if row.state is VmState.UNMANAGED:
                _fail(grpc.StatusCode.FAILED_PRECONDITION, f"VM {row.name} is unmanaged: register it with "
                                                           "`kvmha vm create` (same uuid) to adopt it first")
            return VmId(row.id)

        vm_id = await self._service.run(find, lambda v: [make(v)])
        return await self._vm_info(str(vm_id))

    async def DeleteVm(self, request: pb.Ref, context: Context) -> pb.DeleteVmResponse:
        def find(uow: UnitOfWork) -> VmId:
            row = _vm(uow, request.ref)
            if row.state in ACTIVE_VM_STATES or row.power_state is PowerState.POWER_ON:
                _fail(grpc.StatusCode.FAILED_PRECONDITION, f"VM {row.name} is {row.state} ({row.power_state}): "
                                                           "stop it before deleting it")
            return VmId(row.id)

        async def delete() -> pb.DeleteVmResponse:
            vm_id = await self._service.run(find, lambda v: [facts.VmDeleted(vm_id=v)])
            return pb.DeleteVmResponse(id=vm_id)

        return await self._guard(context, delete())  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ HA work, events, config

    async def ListHaWork(self, request: pb.ListHaWorkRequest, context: Context) -> pb.ListHaWorkResponse:
        def listing(uow: UnitOfWork) -> pb.ListHaWorkResponse:
            vms = {v.id: v for v in uow.vms.rows()}
            hosts = {h.id: h.name for h in uow.hosts.rows()}
            return pb.ListHaWorkResponse(items=[_work_info(w, vms, hosts) for w in uow.works.all(request.active_only)])

        return await self._service.read(listing)

    async def ListEvents(self, request: pb.ListEventsRequest, context: Context) -> pb.ListEventsResponse:
        rows = await self._events(request.after_id, request.limit or 200, request.subject)
        return pb.ListEventsResponse(events=[_event_info(e) for e in rows])

    async def _events(self, after_id: int, limit: int, subject: str) -> list[EventRow]:
        return await self._service.read(lambda uow: uow.events.all(after_id, min(limit, 10_000), subject))

    async def FollowEvents(self, request: pb.ListEventsRequest, context: Context) -> AsyncIterator[pb.EventInfo]:
        after_id = request.after_id
        while True:
            rows = await self._events(after_id, 500, request.subject)
            for row in rows:
                yield _event_info(row)
                after_id = row.id
            if not rows:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._events_recorded.wait(), timeout=2.0)

    async def ListConfig(self, request: pb.ListConfigRequest, context: Context) -> pb.ListConfigResponse:
        rows = await self._service.read(lambda uow: uow.config.all())
        overrides = dict(self._service.settings.config_overrides)
        return pb.ListConfigResponse(items=[_config_item(r, overrides.get(r.name)) for r in rows])

    async def SetConfig(self, request: pb.SetConfigRequest, context: Context) -> pb.ConfigItem:
        def store(uow: UnitOfWork) -> ConfigRow:
            rows = {row.name: row.effective for row in uow.config.all()}
            if request.name not in rows:
                _fail(grpc.StatusCode.NOT_FOUND, f"no setting named {request.name!r}")
            # The [config] table of manager.toml wins over the database: a value set here would not be used.
            overrides = dict(self._service.settings.config_overrides)
            if request.name in overrides:
                _fail(grpc.StatusCode.FAILED_PRECONDITION,
                      f"{request.name} is set to {overrides[request.name]} in this manager's manager.toml ([config]), "
                      "which wins over `kvmha config set`: change it there")
            try:
                # Checked against the configuration in effect (file overrides included), which the core runs on.
                self._service.config = CoreConfig.from_mapping({**rows, request.name: request.value, **overrides})
            except ConfigError as error:
                _fail(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            row = uow.config.set(request.name, request.value, self._service.clock())
            uow.commit()
            return row

        async def change() -> pb.ConfigItem:
            row = await self._service.run(store, lambda r: [facts.ConfigChanged(name=r.name, value=r.effective)])
            return _config_item(row)

        return await self._guard(context, change())  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- helpers (pure)


def _host(uow: UnitOfWork, ref: str) -> Host:
    row = uow.hosts.find(ref) if ref else None
    if row is None:
        _fail(grpc.StatusCode.NOT_FOUND, f"no host {ref!r} (give its id, uuid or name)")
    return row


def _vm(uow: UnitOfWork, ref: str) -> VmInstance:
    row = uow.vms.find(ref) if ref else None
    if row is None:
        _fail(grpc.StatusCode.NOT_FOUND, f"no VM {ref!r} (give its id, uuid or name)")
    return row


def _created(record: VmRecord, start: bool) -> list[facts.Fact]:
    wanted: list[facts.Fact] = [facts.VmRegistered(vm=record)]
    if start and record.state is VmState.STOPPED:
        wanted.append(facts.VmStartRequested(vm_id=record.id))
    return wanted


def _opt_host(host_id: int | None) -> HostId | None:
    return HostId(host_id) if host_id is not None else None


def _running_by_host(uow: UnitOfWork) -> Counter[int]:
    """VMs powered on, by host: one query for a whole listing (not one per host)."""
    return Counter(v.host_id for v in uow.vms.rows() if v.power_state is PowerState.POWER_ON and v.host_id is not None)


def _host_info(row: Host, connected: set[HostId], pings: dict[int, float], running: Counter[int]) -> pb.HostInfo:
    last_ping_at = max(row.last_ping_at or 0.0, pings.get(row.id, 0.0))
    bmc = f"{row.bmc_address}:{row.bmc_port}" if row.bmc_address else ""
    return pb.HostInfo(id=row.id, uuid=row.uuid, name=row.name, address=row.address, status=row.status.value,
                       resource_state=row.resource_state.value, role=row.role.value,
                       last_ping_at=last_ping_at, cpus=row.cpus, memory_mib=row.memory_mib, vms_running=running[row.id],
                       connected=HostId(row.id) in connected, has_bmc=bool(row.bmc_address),
                       bmc_address=bmc, manager_id=row.manager_id or "", agent_version=row.agent_version)


def _vm_info(row: VmInstance, host_names: dict[int, str]) -> pb.VmInfo:
    return pb.VmInfo(id=row.id, uuid=row.uuid, name=row.name, state=row.state.value,
                     power_state=row.power_state.value, power_state_updated_at=row.power_state_updated_at or 0.0,
                     host=host_names.get(row.host_id or 0, ""), last_host=host_names.get(row.last_host_id or 0, ""),
                     ha_enabled=row.ha_enabled, restart_priority=row.restart_priority,
                     anti_affinity_group=row.anti_affinity_group or "", memory_mib=row.memory_mib, vcpus=row.vcpus,
                     update_count=row.update_count)


def _work_info(work: HaWorkRecord, vms: dict[int, VmInstance], hosts: dict[int, str]) -> pb.HaWorkInfo:
    vm = vms.get(work.vm_id)
    return pb.HaWorkInfo(id=work.id, vm=vm.name if vm else "", vm_uuid=vm.uuid if vm else "", type=work.type.value,
                         step=work.step.value, host=hosts.get(work.host_id or 0, ""), tried=work.tried,
                         time_to_try_at=work.time_to_try_at, reason=work.reason, created_at=work.created_at,
                         updated_at=work.updated_at, taken_by=work.taken_by or "")


def _event_info(row: EventRow) -> pb.EventInfo:
    return pb.EventInfo(id=row.id, at=row.at, severity=row.severity, subject=row.subject, kind=row.kind,
                        message=row.message)


def _config_item(row: ConfigRow, override: str | None = None) -> pb.ConfigItem:
    """The value in effect: the manager.toml override when there is one (scope "manager.toml"), else the row's."""
    return pb.ConfigItem(name=row.name, value=row.effective if override is None else override,
                         default_value=row.default_value, description=row.description,
                         scope=row.scope if override is None else "manager.toml")


def _vm_from_xml(request: pb.CreateVmRequest) -> VmRecord:
    """Read name, uuid, memory and vCPUs from the domain XML; a missing uuid is added so restarts keep it."""
    if len(request.domain_xml.encode()) > MAX_XML_BYTES:
        _fail(grpc.StatusCode.INVALID_ARGUMENT, "domain XML is larger than 1 MiB")
    try:
        root = ET.fromstring(request.domain_xml)
    except ET.ParseError as error:
        _fail(grpc.StatusCode.INVALID_ARGUMENT, f"domain XML does not parse: {error}")
    if root.tag != "domain":
        _fail(grpc.StatusCode.INVALID_ARGUMENT, f"the XML's root is <{root.tag}>, not <domain>")
    name = request.name or (root.findtext("name") or "").strip()
    if not name:
        _fail(grpc.StatusCode.INVALID_ARGUMENT, "the domain has no <name> (or pass a name)")
    _set_text(root, "name", name)
    uuid_text = (root.findtext("uuid") or "").strip() or str(uuid_module.uuid4())
    try:
        uuid = str(uuid_module.UUID(uuid_text))
    except ValueError:
        _fail(grpc.StatusCode.INVALID_ARGUMENT, f"<uuid> {uuid_text!r} is not a UUID")
    _set_text(root, "uuid", uuid)
    return VmRecord(id=VmId(0), uuid=VmUuid(uuid), name=name, state=VmState.STOPPED,
                    ha_enabled=request.ha_enabled, restart_priority=request.restart_priority,
                    anti_affinity_group=request.anti_affinity_group or None, memory_mib=_memory_mib(root),
                    vcpus=_int(root.findtext("vcpu"), "vcpu", default=1), domain_xml=ET.tostring(root, "unicode"))


def _set_text(root: ET.Element, tag: str, text: str) -> None:
    element = root.find(tag)
    if element is None:
        element = ET.SubElement(root, tag)
    element.text = text


_UNIT_TO_MIB = {"b": 1 / (1 << 20), "bytes": 1 / (1 << 20), "k": 1 / 1024, "kib": 1 / 1024, "kb": 1000 / (1 << 20),
                "m": 1, "mib": 1, "mb": 1e6 / (1 << 20), "g": 1024, "gib": 1024, "gb": 1e9 / (1 << 20)}


def _memory_mib(root: ET.Element) -> int:
    element = root.find("memory")
    if element is None:
        _fail(grpc.StatusCode.INVALID_ARGUMENT, "the domain has no <memory>")
    unit = (element.get("unit") or "KiB").lower()
    if unit not in _UNIT_TO_MIB:
        _fail(grpc.StatusCode.INVALID_ARGUMENT, f"<memory unit='{unit}'> is not a unit kvmha knows")
    return max(1, round(_int(element.text, "memory") * _UNIT_TO_MIB[unit]))


def _int(text: str | None, what: str, default: int | None = None) -> int:
    if text is None and default is not None:
        return default
    try:
        value = int((text or "").strip())
    except ValueError:
        _fail(grpc.StatusCode.INVALID_ARGUMENT, f"<{what}> {text!r} is not a whole number")
    if value <= 0:
        _fail(grpc.StatusCode.INVALID_ARGUMENT, f"<{what}> must be positive")
    return value
