"""The AdminService gRPC servicer behind the operator CLI: protobuf in, operator operations, protobuf out.

A thin translator: requests become calls of kvmha.manager.operations over the `OperatorPort` (listings read the
store, changes run in the driver's order with the agents' facts and answer once the core's reaction is recorded),
their plain records become wire messages, and an `OperationError` becomes the gRPC status its refusal names, with
the operator's message. This module knows no service, driver or database row.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc

from kvmha.manager import operations as ops
from kvmha.manager.core import facts
from kvmha.manager.core.model import HaWorkRecord, HostId, VmId, VmRecord
from kvmha.manager.domainxml import vm_from_xml
from kvmha.manager.driver import NotActive
from kvmha.manager.operations import LiveHosts, OperationError, OperatorPort, Refusal
from kvmha.manager.security.auth import peer_identity
from kvmha.manager.store import BmcCredentials, ConfigRow, EventRow, HostDetails, UnitOfWork
from kvmha.proto.metadata import NOT_ACTIVE_KEY
from kvmha.proto.v1 import admin_pb2 as pb
from kvmha.proto.v1 import admin_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
STATUS = {
    Refusal.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Refusal.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Refusal.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
}


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, port: OperatorPort, domain_xml_allow: tuple[str, ...] = ()) -> None:
        self._port = port
        self._domain_xml_allow = domain_xml_allow  # guarded domain XML elements allowed (domainpolicy.py)
        self._events_recorded = asyncio.Event()
        port.on_events_recorded(self._notify)

    def _notify(self) -> None:
        # Wake every follower waiting on the current Event; later waiters get a fresh one.
        self._events_recorded.set()
        self._events_recorded = asyncio.Event()

    async def _guard(self, context: Context, call: Awaitable[T]) -> T:
        try:
            return await call
        except OperationError as error:
            await context.abort(STATUS[error.refusal], str(error))
        except NotActive as standby:  # a change needs the manager that holds the lease: say which one it is
            lease = await self._port.read(lambda uow: uow.managers.lease())
            holder_id = lease.manager_id if lease is not None and lease.manager_id else ""
            holder = f"; the lease is held by {holder_id}" if holder_id else ""
            # Refused before anything was done: the trailer lets a client send the same request elsewhere.
            context.set_trailing_metadata(((NOT_ACTIVE_KEY, holder_id),))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{standby}{holder}")

    # ------------------------------------------------------------------ hosts

    async def ListHosts(self, request: pb.ListHostsRequest, context: Context) -> pb.ListHostsResponse:
        live = self._port.live_hosts()

        def listing(uow: UnitOfWork) -> pb.ListHostsResponse:
            after_id, limit = _page(request.page_size, request.page_token)
            page = uow.hosts.details(after_id, limit)
            running = uow.vms.running_by_host([h.host.id for h in page])
            return pb.ListHostsResponse(hosts=[_host_info(h, live, running) for h in page],
                                        next_page_token=_next_token([h.host.id for h in page], limit))

        return await self._guard(context, self._port.read(listing))

    async def GetHost(self, request: pb.Ref, context: Context) -> pb.HostInfo:
        return await self._guard(context, self._host_info(request.ref))

    async def _host_info(self, ref: str) -> pb.HostInfo:
        live = self._port.live_hosts()
        def info(uow: UnitOfWork) -> pb.HostInfo:
            details = ops.host(uow, ref)
            return _host_info(details, live, uow.vms.running_by_host([details.host.id]))

        return await self._port.read(info)

    async def SetMaintenance(self, request: pb.SetMaintenanceRequest, context: Context) -> pb.HostInfo:
        return await self._guard(context, self._host_change(*ops.maintenance(request.host, request.on)))

    async def SetHostBmc(self, request: pb.SetHostBmcRequest, context: Context) -> pb.HostInfo:
        credentials = None if request.clear else BmcCredentials(request.address, request.port, request.user,
                                                                 request.password)

        async def change() -> pb.HostInfo:
            return await self._host_change(*ops.set_bmc(request.host, credentials))

        return await self._guard(context, change())

    async def ConfirmHostDown(self, request: pb.ConfirmHostDownRequest, context: Context) -> pb.HostInfo:
        async def change() -> pb.HostInfo:
            return await self._host_change(*ops.confirm_down(request.host, _confirmer(request, context)))

        return await self._guard(context, change())

    async def SetHostEnabled(self, request: pb.SetHostEnabledRequest, context: Context) -> pb.HostInfo:
        return await self._guard(context, self._host_change(*ops.enabled(request.host, request.enabled)))

    async def RemoveHost(self, request: pb.Ref, context: Context) -> pb.HostInfo:
        return await self._guard(context, self._host_change(*ops.removable_host(request.ref)))

    async def AddHost(self, request: pb.AddHostRequest, context: Context) -> pb.HostInfo:
        async def add() -> pb.HostInfo:
            record = await self._port.run(*ops.add_host(request.name, request.uuid, request.address))
            return await self._host_info(str(record.id))

        return await self._guard(context, add())

    async def _host_change(self, operation: ops.Operation[HostId],
                           then: Callable[[HostId], list[facts.Fact]]) -> pb.HostInfo:
        host_id = await self._port.run(operation, then)
        return await self._host_info(str(host_id))

    # ------------------------------------------------------------------ VMs

    async def ListVms(self, request: pb.ListVmsRequest, context: Context) -> pb.ListVmsResponse:
        def listing(uow: UnitOfWork) -> pb.ListVmsResponse:
            after_id, limit = _page(request.page_size, request.page_token)
            host_id = ops.host(uow, request.host).host.id if request.host else None
            names = _host_names(uow)
            page = uow.vms.all(host_id, after_id, limit)
            return pb.ListVmsResponse(vms=[_vm_info(v, names) for v in page],
                                      next_page_token=_next_token([v.id for v in page], limit))

        return await self._guard(context, self._port.read(listing))

    async def GetVm(self, request: pb.Ref, context: Context) -> pb.VmInfo:
        return await self._guard(context, self._vm_info(request.ref))

    async def _vm_info(self, ref: str) -> pb.VmInfo:
        def read(uow: UnitOfWork) -> pb.VmInfo:
            record = ops.vm(uow, ref)
            return _vm_info(record, _host_names(uow), ops.vm_reason(uow, record))

        return await self._port.read(read)

    async def CreateVm(self, request: pb.CreateVmRequest, context: Context) -> pb.VmInfo:
        async def create() -> pb.VmInfo:
            if request.host:
                ops.refuse(Refusal.INVALID, "choosing the host is not supported yet: placement picks it")
            record = vm_from_xml(request.domain_xml, name=request.name, ha_enabled=request.ha_enabled,
                                 restart_priority=request.restart_priority,
                                 anti_affinity_group=request.anti_affinity_group, allowed=self._domain_xml_allow)
            registered = await self._port.run(*ops.register_vm(record, start=request.start))
            return await self._vm_info(str(registered.id))

        return await self._guard(context, create())

    async def StartVm(self, request: pb.Ref, context: Context) -> pb.VmInfo:
        async def start() -> pb.VmInfo:
            refused = self._port.admission(request.ref)  # issue 16: an HA VM that would break the failure reserve
            if refused:
                ops.refuse(Refusal.FAILED_PRECONDITION, refused)
            return await self._vm_fact(request.ref, lambda v: facts.VmStartRequested(vm_id=v))

        return await self._guard(context, start())

    async def PlanFailure(self, request: pb.PlanFailureRequest, context: Context) -> pb.PlanFailureResponse:
        async def plan() -> pb.PlanFailureResponse:
            result = self._port.plan_failure(list(request.fail))
            reply = pb.PlanFailureResponse(failed=list(result.failed),
                                           admission_host_failures=result.admission_host_failures)
            for step in result.vms:
                item = reply.vms.add(vm=step.name, from_host=step.from_host, ha=step.ha, target=step.target or "",
                                     reason=step.reason, order=step.order)
                if step.eta_s is not None:
                    item.eta_s = step.eta_s
            for room in result.headroom:
                reply.hosts.add(host=room.host, free_memory_mib=room.free_memory_mib, reserve_mib=room.reserve_mib,
                                free_vcpus=room.free_vcpus, inventory_reported=room.inventory_reported)
            return reply

        return await self._guard(context, plan())

    async def StopVm(self, request: pb.Ref, context: Context) -> pb.VmInfo:
        return await self._guard(context, self._vm_fact(request.ref, lambda v: facts.VmStopRequested(vm_id=v)))

    async def SetVmHa(self, request: pb.SetVmHaRequest, context: Context) -> pb.VmInfo:
        async def set_ha() -> pb.VmInfo:
            # issue 16: HA on for a running VM is like starting a new HA VM: it must fit the failure reserve
            refused = self._port.admission(request.vm, ha_on=True) if request.enabled else ""
            if refused:
                ops.refuse(Refusal.FAILED_PRECONDITION, refused)
            return await self._vm_fact(request.vm, lambda v: facts.VmHaChanged(vm_id=v, enabled=request.enabled))

        return await self._guard(context, set_ha())

    async def MigrateVm(self, request: pb.MigrateVmRequest, context: Context) -> pb.VmInfo:
        async def migrate() -> pb.VmInfo:
            vm_id, _ = await self._port.run(*ops.migratable_vm(request.vm, request.to_host or None))
            return await self._vm_info(str(vm_id))

        return await self._guard(context, migrate())

    async def CancelMigration(self, request: pb.Ref, context: Context) -> pb.VmInfo:
        return await self._guard(context, self._vm_fact(
            request.ref, lambda v: facts.VmMigrationCancelRequested(vm_id=v)))

    async def _vm_fact(self, ref: str, make: Callable[[VmId], facts.Fact]) -> pb.VmInfo:
        vm_id = await self._port.run(ops.managed_vm(ref), lambda v: [make(v)])
        return await self._vm_info(str(vm_id))

    async def DeleteVm(self, request: pb.Ref, context: Context) -> pb.DeleteVmResponse:
        async def delete() -> pb.DeleteVmResponse:
            vm_id = await self._port.run(ops.deletable_vm(request.ref), lambda v: [facts.VmDeleted(vm_id=v)])
            return pb.DeleteVmResponse(id=vm_id)

        return await self._guard(context, delete())

    # ------------------------------------------------------------------ HA work, events, config

    async def ListHaWork(self, request: pb.ListHaWorkRequest, context: Context) -> pb.ListHaWorkResponse:
        def listing(uow: UnitOfWork) -> pb.ListHaWorkResponse:
            vms = {v.id: v for v in uow.vms.all()}
            hosts = _host_names(uow)
            return pb.ListHaWorkResponse(items=[_work_info(w, vms, hosts) for w in uow.works.all(request.active_only)])

        return await self._port.read(listing)

    async def ListEvents(self, request: pb.ListEventsRequest, context: Context) -> pb.ListEventsResponse:
        limit = min(request.limit or 200, 10_000)
        rows = await self._events(request.after_id, limit, request.subject)
        return pb.ListEventsResponse(events=[_event_info(e) for e in rows],
                                     next_page_token=_next_token([e.id for e in rows], limit))

    async def _events(self, after_id: int, limit: int, subject: str) -> list[EventRow]:
        return await self._port.read(lambda uow: uow.events.all(after_id, min(limit, 10_000), subject))

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
        rows = await self._port.read(lambda uow: uow.config.all())
        overrides = self._port.config_overrides
        return pb.ListConfigResponse(items=[_config_item(r, overrides.get(r.name)) for r in rows])

    async def ListManagers(self, request: pb.ListManagersRequest, context: Context) -> pb.ListManagersResponse:
        rows, lease = await self._port.read(lambda uow: (uow.managers.all(), uow.managers.lease()))
        me = self._port.manager_id
        holder = lease.manager_id if lease is not None else None
        managers = [pb.ManagerInfo(id=r.id, address=r.address, version=r.version, started_at=r.started_at,
                                   last_heartbeat_at=r.last_heartbeat_at, hosts_owned=r.hosts_owned,
                                   holds_lease=r.id == holder, answering=r.id == me) for r in rows]
        if lease is None or holder is None:
            return pb.ListManagersResponse(managers=managers)
        return pb.ListManagersResponse(managers=managers, lease_holder=holder, lease_epoch=lease.epoch,
                                       lease_expires_in_s=lease.expires_at - lease.database_now)

    async def SetConfig(self, request: pb.SetConfigRequest, context: Context) -> pb.ConfigItem:
        async def change() -> pb.ConfigItem:
            row = await self._port.run(*ops.set_config(request.name, request.value, self._port.config_overrides))
            return _config_item(row)

        return await self._guard(context, change())


def _confirmer(request: pb.ConfirmHostDownRequest, context: Context) -> str:
    """Who confirms a host down, for the record: the client certificate's name when the link has one (it cannot be
    made up), with the name the operator gave; without TLS identities, the given name and where the call came from."""
    claimed = request.confirmed_by.strip()[:64]
    identity = peer_identity(context)
    certified = identity.common_name[:64] if identity is not None else ""
    if certified:
        return certified if claimed in ("", certified) else f"{claimed} (certificate {certified})"
    return f"{claimed or 'an unnamed operator'} from {context.peer()[:64]}"


# ---------------------------------------------------------------------- records -> wire messages


def _host_names(uow: UnitOfWork) -> dict[int, str]:
    return {host.id: host.name for host in uow.hosts.all()}


MAX_PAGE = 1000


def _page(page_size: int, token: str) -> tuple[int, int | None]:
    """(after id, limit) of a listing request; a token that is not ours is a client error."""
    try:
        after_id = int(token) if token else 0
    except ValueError:
        raise OperationError(Refusal.INVALID, f"page_token {token[:40]!r} is not one this manager gave") from None
    return after_id, (min(page_size, MAX_PAGE) if page_size else None)


def _next_token(ids: list[int], limit: int | None) -> str:
    return str(ids[-1]) if limit is not None and len(ids) >= limit else ""


def _host_info(details: HostDetails, live: LiveHosts, running: Mapping[HostId, int]) -> pb.HostInfo:
    host = details.host
    last_ping_at = max(host.last_ping_at or 0.0, live.last_ping_at.get(host.id, 0.0))
    bmc = f"{details.bmc_address}:{details.bmc_port}" if details.bmc_address else ""
    return pb.HostInfo(id=host.id, uuid=host.uuid, name=host.name, address=host.address, status=host.status.value,
                       resource_state=host.resource_state.value, role=host.role.value, last_ping_at=last_ping_at,
                       cpus=host.capacity.cpus, memory_mib=host.capacity.memory_mib,
                       vms_running=running.get(host.id, 0),
                       connected=host.id in live.connected, has_bmc=host.has_bmc, bmc_address=bmc,
                       manager_id=details.manager_id or "", agent_version=details.agent.agent_version,
                       watchdog_armed=host.watchdog_timeout_s is not None,
                       watchdog_timeout_s=host.watchdog_timeout_s or 0.0, watchdog_detail=host.watchdog_detail,
                       lease_manager=host.lease_manager)


def _vm_info(vm: VmRecord, host_names: dict[int, str], reason: str = "") -> pb.VmInfo:
    return pb.VmInfo(id=vm.id, uuid=vm.uuid, name=vm.name, state=vm.state.value, power_state=vm.power_state.value,
                     power_state_updated_at=vm.power_state_updated_at or 0.0, host=host_names.get(vm.host_id or 0, ""),
                     last_host=host_names.get(vm.last_host_id or 0, ""), ha_enabled=vm.ha_enabled,
                     restart_priority=vm.restart_priority, anti_affinity_group=vm.anti_affinity_group or "",
                     memory_mib=vm.memory_mib, vcpus=vm.vcpus, update_count=vm.update_count, reason=reason)


def _work_info(work: HaWorkRecord, vms: dict[VmId, VmRecord], hosts: dict[int, str]) -> pb.HaWorkInfo:
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
