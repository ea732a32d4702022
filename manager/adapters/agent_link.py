"""The AgentLink gRPC servicer: one bidirectional stream per agent, translated into core facts.

Stream protocol (see proto/kvmha/v1/agent.proto): Hello first, within `hello_timeout_s`; the manager answers Welcome
or Reject. Every message is checked field by field first (wirecheck.py): a bad one ends its stream with
INVALID_ARGUMENT and one `wire.invalid` event, and never reaches the core or the database. After Welcome the
agent's messages become facts; commands from the core are queued on the session and
written by this stream. A bad stream is ended with a gRPC status that says why (INVALID_ARGUMENT for a malformed
message, FAILED_PRECONDITION for messages out of order, ALREADY_EXISTS for a duplicate host, RESOURCE_EXHAUSTED for
a flood); other agents' streams are never affected.

With mutual TLS (the default) a Hello must name the host uuid bound in the peer's certificate, or the stream is
refused with a `security` event naming the peer's address; certificates of another CA never get past the handshake.

A second stream for a host that is already connected: if the first stream was heard from recently, the second is
rejected as a duplicate (two agents claiming one uuid is a configuration error that must not flap the host); if the
first has gone quiet, the second replaces it (an agent that reconnects before the manager noticed its old TCP
connection died). Either way it is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from kvmha.manager.adapters import translate, wirecheck
from kvmha.manager.adapters.translate import WireError
from kvmha.manager.core import actions, facts
from kvmha.manager.core.actions import Severity
from kvmha.manager.core.model import HostId, RequestId
from kvmha.manager.driver import StoreUnavailable
from kvmha.manager.hub import AgentHello, NotActive, UnknownHost, WelcomeTerms
from kvmha.manager.security.auth import peer_identity
from kvmha.manager.security.pki import Identity
from kvmha.proto.v1 import agent_pb2 as pb
from kvmha.proto.v1 import agent_pb2_grpc

log = logging.getLogger("kvmha.manager.link")

OUTBOUND_QUEUE_LIMIT = 1000
STORE_RETRY_S = 5.0  # a Hello refused because the database cannot commit: try again after this


class RejectError(Exception):
    """The hub refuses this agent; the code and reason go back in a Reject."""

    def __init__(self, code: pb.RejectCode.ValueType, reason: str, status: grpc.StatusCode,
                 retry_after_s: float = 10.0) -> None:
        super().__init__(reason)
        self.code, self.reason, self.status, self.retry_after_s = code, reason, status, retry_after_s


class LinkHub(Protocol):
    """What a stream needs from the manager (implemented by kvmha.manager.hub.AgentHub): plain values, no wire."""

    async def register_agent(self, hello: AgentHello, peer: str) -> HostId: ...
    def welcome(self, host_id: HostId) -> WelcomeTerms: ...
    def submit(self, fact: facts.Fact, received_at: float | None = None) -> None: ...
    def record_event(self, severity: Severity, kind: str, message: str) -> None:
        """An event about a stream (a refused identity, a malformed message), outside the core's facts."""
    def ping_read(self, stream: int, sent_mono_s: float, arrival_s: float) -> None:
        """A ping built at `sent_mono_s` on its agent's clock was read at `arrival_s` (kvmha.manager.hearing)."""
    def stream_ended(self, stream: int) -> None: ...


@dataclass
class AgentSession:
    host_id: HostId
    uuid: str
    peer: str
    outbound: asyncio.Queue[pb.ManagerMessage | None] = field(
        default_factory=lambda: asyncio.Queue(OUTBOUND_QUEUE_LIMIT)
    )
    last_heard_at: float = field(default_factory=time.monotonic)
    neighbor_targets: dict[RequestId, HostId] = field(default_factory=dict)
    # Commands sent on this stream and not answered yet: a result for any other id (another host's command, a
    # forged or a stale one) is dropped, so one agent can never settle a command meant for another host.
    awaiting: set[RequestId] = field(default_factory=set)
    closed_reason: str = ""

    def send(self, message: pb.ManagerMessage) -> bool:
        if self.closed_reason:
            return False
        try:
            self.outbound.put_nowait(message)
        except asyncio.QueueFull:
            self.close("agent does not read its commands (outbound queue full)")
            return False
        return True

    def close(self, reason: str) -> None:
        if not self.closed_reason:
            self.closed_reason = reason
            with contextlib.suppress(asyncio.QueueFull):
                self.outbound.put_nowait(None)


class LinkRegistry:
    """The open streams, by host."""

    def __init__(self, quiet_after_s: Callable[[], float]) -> None:
        self._by_host: dict[HostId, AgentSession] = {}
        self._by_uuid: dict[str, AgentSession] = {}
        self._quiet_after_s = quiet_after_s
        self.epoch = 0  # this manager's lease epoch, stamped on every command (the agents' fencing token)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self, host_id: HostId) -> AgentSession | None:
        return self._by_host.get(host_id)

    def send_command(self, action: actions.SendCommand) -> bool:
        """Queue a core command on its host's stream; False when there is no open stream to take it."""
        session = self._by_host.get(action.host_id)
        if session is None:
            return False
        session.awaiting.add(action.request_id)
        if isinstance(action.command, actions.CheckNeighbor):
            session.neighbor_targets[action.request_id] = action.command.target_host_id
        return session.send(translate.command_message(action.request_id, action.command, action.timeout_s,
                                                      self.epoch))

    def disconnect(self, host_id: HostId, reason: str) -> None:
        session = self._by_host.get(host_id)
        if session is not None:
            session.close(reason)

    def __len__(self) -> int:
        return len(self._by_host)

    def hosts(self) -> set[HostId]:
        return set(self._by_host)

    def refuse_duplicate(self, uuid: str, peer: str) -> None:
        """Raise the Reject for a Hello of a host whose stream is open and alive. Checked before the Hello is
        registered, so that an impostor's Hello changes nothing (not the host's name, not its link state)."""
        current = self._by_uuid.get(uuid)
        if current is not None:
            self._refuse_if_live(current, uuid, peer)

    def _refuse_if_live(self, current: AgentSession, uuid: str, peer: str) -> float:
        quiet_s = time.monotonic() - current.last_heard_at
        if quiet_s < self._quiet_after_s():
            log.warning("event=duplicate_stream host_id=%s uuid=%s peer=%s existing_peer=%s quiet_s=%.1f "
                        "action=reject", current.host_id, uuid, peer, current.peer, quiet_s)
            raise RejectError(pb.REJECT_DUPLICATE_HOST, f"host {uuid} is already connected from {current.peer}",
                              grpc.StatusCode.ALREADY_EXISTS)
        return quiet_s

    def claim(self, session: AgentSession) -> None:
        current = self._by_host.get(session.host_id)
        if current is not None:
            quiet_s = self._refuse_if_live(current, session.uuid, session.peer)
            log.warning("event=stream_replaced host_id=%s old_peer=%s new_peer=%s quiet_s=%.1f",
                        session.host_id, current.peer, session.peer, quiet_s)
            current.close("replaced by a newer stream of the same host")
        self._by_host[session.host_id] = session
        self._by_uuid[session.uuid] = session

    def release(self, session: AgentSession) -> bool:
        """Forget the session; False when a newer stream had already replaced it."""
        if self._by_host.get(session.host_id) is session:
            del self._by_host[session.host_id]
            if self._by_uuid.get(session.uuid) is session:
                del self._by_uuid[session.uuid]
            return True
        return False

    def close_all(self, reason: str) -> None:
        for session in list(self._by_host.values()):
            session.close(reason)


class FloodGuard:
    """Token bucket: a stream that sends more than `rate_per_s` messages (bursts up to `burst`) is cut off."""

    def __init__(self, rate_per_s: float = 500.0, burst: float = 5000.0) -> None:
        self._rate, self._burst, self._tokens, self._at = rate_per_s, burst, burst, time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class StreamError(Exception):
    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status = status


class AgentLinkServicer(agent_pb2_grpc.AgentLinkServicer):
    """`host_certificates`: the manager runs mutual TLS, so every stream's Hello must name the host uuid bound in
    its certificate (kvmha pki host); False only on explicitly allowed plaintext."""

    def __init__(self, hub: LinkHub, registry: LinkRegistry, hello_timeout_s: float = 10.0,
                 host_certificates: bool = False) -> None:
        self._hub, self._registry, self._hello_timeout_s = hub, registry, hello_timeout_s
        self._host_certificates = host_certificates

    async def Connect(
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext[
            pb.AgentMessage, pb.ManagerMessage]
    ) -> AsyncIterator[pb.ManagerMessage]:
        peer = context.peer()
        try:
            session = await self._open(request_iterator, peer, peer_identity(context))
        except RejectError as rejected:
            log.warning("event=agent_rejected peer=%s code=%s reason=%s", peer,
                        pb.RejectCode.Name(rejected.code), rejected.reason)
            yield pb.ManagerMessage(reject=pb.Reject(code=rejected.code, reason=rejected.reason,
                                                     retry_after_s=rejected.retry_after_s))
            await context.abort(rejected.status, rejected.reason)
            return
        reader: asyncio.Task[bool | StreamError] | None = None
        planned: bool | StreamError | None = None
        try:  # from here on the session is claimed: every exit (a cancel during Welcome too) releases it
            yield pb.ManagerMessage(welcome=translate.welcome(self._hub.welcome(session.host_id)))
            log.info("event=agent_connected host_id=%s uuid=%s peer=%s", session.host_id, session.uuid, peer)
            reader = asyncio.create_task(self._read(request_iterator, session))
            while (message := await session.outbound.get()) is not None:
                yield message
        finally:
            session.close("the stream ended")
            if reader is not None:
                reader.cancel()
                planned = await _result(reader)
            if self._registry.release(session):
                self._hub.submit(facts.AgentDisconnected(host_id=session.host_id, planned=planned is True))
            log.info("event=agent_disconnected host_id=%s peer=%s planned=%s reason=%s", session.host_id, peer,
                     planned is True, session.closed_reason or "stream ended")
        if isinstance(planned, StreamError):
            await context.abort(planned.status, str(planned))

    async def _open(self, request_iterator: AsyncIterator[pb.AgentMessage], peer: str,
                    identity: Identity | None) -> AgentSession:
        try:
            first = await asyncio.wait_for(anext(request_iterator), self._hello_timeout_s)
        except (TimeoutError, StopAsyncIteration):
            raise RejectError(pb.REJECT_BAD_HELLO, "no Hello received", grpc.StatusCode.DEADLINE_EXCEEDED) from None
        if first.WhichOneof("msg") != "hello":
            raise RejectError(pb.REJECT_BAD_HELLO, f"the first message must be Hello, not {first.WhichOneof('msg')}",
                              grpc.StatusCode.FAILED_PRECONDITION)
        try:
            translate.validate_hello(first.hello)
            wirecheck.check(first.hello, "Hello")
        except WireError as error:
            code = pb.REJECT_PROTOCOL_VERSION if "protocol" in str(error) else pb.REJECT_BAD_HELLO
            self._hub.record_event("warning", "wire.invalid", f"refused a Hello from {peer}: {error}")
            raise RejectError(code, str(error), grpc.StatusCode.INVALID_ARGUMENT) from None
        # One spelling per host: "ABCD..." and "abcd..." are the same uuid, never two hosts.
        first.hello.host_uuid = translate.check_uuid(first.hello.host_uuid, "host_uuid")
        self._check_identity(first.hello.host_uuid, identity, peer)
        self._registry.refuse_duplicate(first.hello.host_uuid, peer)
        try:
            host_id = await self._hub.register_agent(translate.hello(first.hello), peer)
        except NotActive as standby:
            raise RejectError(pb.REJECT_NOT_ACTIVE, standby.reason, grpc.StatusCode.UNAVAILABLE,
                              retry_after_s=standby.retry_after_s) from None
        except UnknownHost as unknown:
            raise RejectError(pb.REJECT_UNKNOWN_HOST, unknown.reason, grpc.StatusCode.PERMISSION_DENIED,
                              retry_after_s=unknown.retry_after_s) from None
        except StoreUnavailable as unavailable:  # nothing can be registered now: come back soon, not an error
            raise RejectError(pb.REJECT_CODE_UNSPECIFIED, str(unavailable), grpc.StatusCode.UNAVAILABLE,
                              retry_after_s=STORE_RETRY_S) from None
        except Exception as error:  # a transaction the database aborted (a deadlock with the driver): try again
            log.warning("event=registration_failed peer=%s error=%s", peer, str(error).splitlines()[0][:200])
            raise RejectError(pb.REJECT_CODE_UNSPECIFIED, "registration failed in the database; try again",
                              grpc.StatusCode.UNAVAILABLE, retry_after_s=STORE_RETRY_S) from None
        session = AgentSession(host_id=host_id, uuid=first.hello.host_uuid, peer=peer)
        self._registry.claim(session)
        return session

    def _check_identity(self, uuid: str, identity: Identity | None, peer: str) -> None:
        """Before anything is registered: a host speaks only for the uuid in its certificate."""
        if not self._host_certificates:
            return
        proven = identity.host_uuid if identity is not None else None
        if proven == uuid:
            return
        who = (f"certificate {identity.common_name!r} ({identity.kind}"
               f"{' ' + proven if proven else ''})" if identity else "no certificate")
        reason = f"Hello names host {uuid} but the peer's {who} does not prove it"
        log.warning("event=security peer=%s uuid=%s reason=%s", peer, uuid, reason)
        self._hub.record_event("alert", "security", f"refused a stream from {peer}: {reason}")
        raise RejectError(pb.REJECT_UNKNOWN_HOST, reason, grpc.StatusCode.PERMISSION_DENIED, retry_after_s=60.0)

    async def _read(
        self, request_iterator: AsyncIterator[pb.AgentMessage], session: AgentSession
    ) -> bool | StreamError:
        """Turn the agent's messages into facts. True when the agent said Goodbye; a StreamError when it misbehaved."""
        guard = FloodGuard()
        try:
            async for message in request_iterator:
                session.last_heard_at = time.monotonic()
                if not guard.allow():
                    raise StreamError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many messages; slow down")
                if message.WhichOneof("msg") == "goodbye":
                    return True
                wirecheck.check(message, "AgentMessage")
                fact = self._fact(message, session)
                if fact is None:
                    continue
                # Stamped with its arrival: the core counts silence from here. How late it was read counts too.
                self._hub.submit(fact, session.last_heard_at)
                if isinstance(fact, facts.HeartbeatReceived) and message.ping.sent_mono_s > 0:
                    self._hub.ping_read(id(session), message.ping.sent_mono_s, session.last_heard_at)
            return False
        except (WireError, StreamError) as error:
            status = error.status if isinstance(error, StreamError) else grpc.StatusCode.INVALID_ARGUMENT
            log.warning("event=stream_error host_id=%s peer=%s status=%s error=%s", session.host_id, session.peer,
                        status.name, error)
            self._hub.record_event("warning", "wire.invalid", f"ended the stream of host {session.host_id} from "
                                   f"{session.peer}: {status.name}: {error}")
            return StreamError(status, str(error))
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            return False
        finally:
            session.close("the agent's stream ended")
            self._hub.stream_ended(id(session))

    def _fact(self, message: pb.AgentMessage, session: AgentSession) -> facts.Fact | None:
        kind = message.WhichOneof("msg")
        if kind == "ping":
            return translate.heartbeat(session.host_id, message.ping)
        if kind == "power":
            return translate.power_report(session.host_id, message.power)
        if kind == "inventory":
            return facts.InventoryChanged(session.host_id, translate.inventory(message.inventory))
        if kind == "progress":
            if message.progress.request_id not in session.awaiting:
                return None  # progress of a command this stream did not carry: nothing to say about it
            return translate.migration_progress(session.host_id, message.progress)
        if kind == "result":
            completed = translate.command_result(message.result)
            if completed.request_id not in session.awaiting:
                log.warning("event=result_dropped host_id=%s request_id=%.80s reason=not_sent_on_this_stream",
                            session.host_id, completed.request_id)
                return None
            session.awaiting.discard(completed.request_id)
            target = session.neighbor_targets.pop(completed.request_id, None)
            if isinstance(completed.payload, facts.NeighborCheck) and target is not None:
                payload = facts.NeighborCheck(target, completed.payload.tcp_reachable,
                                              completed.payload.icmp_reachable, completed.payload.heartbeat_age_s)
                return facts.CommandCompleted(completed.request_id, completed.ok, completed.error, payload)
            return completed
        raise StreamError(grpc.StatusCode.FAILED_PRECONDITION, f"unexpected {kind or 'empty'} message after Hello")


async def _result(task: asyncio.Task[bool | StreamError]) -> bool | StreamError | None:
    try:
        return await task
    except asyncio.CancelledError:
        return None
    except Exception as error:  # a bug in translating one message: end this stream (one line), keep the manager
        log.error("event=stream_failed error=%r", error)
        return StreamError(grpc.StatusCode.INTERNAL, f"the manager could not handle a message: {error!r}"[:300])
