"""A command result is accepted only on the stream its command was sent on, once."""

from __future__ import annotations

from kvmha.manager.adapters.agent_link import AgentLinkServicer, AgentSession, LinkRegistry
from kvmha.manager.core import facts
from kvmha.manager.core.actions import Severity
from kvmha.manager.core.model import HostId, RequestId
from kvmha.manager.hub import AgentHello, WelcomeTerms
from kvmha.proto.v1 import agent_pb2 as pb


class NullHub:
    async def register_agent(self, hello: AgentHello, peer: str) -> HostId:
        raise AssertionError("not used")

    def welcome(self, host_id: HostId) -> WelcomeTerms:
        raise AssertionError("not used")

    def submit(self, fact: facts.Fact, received_at: float | None = None) -> None:
        raise AssertionError("not used")

    def record_event(self, severity: Severity, kind: str, message: str) -> None:
        raise AssertionError("not used")

    def ping_read(self, stream: int, sent_mono_s: float, arrival_s: float) -> None:
        raise AssertionError("not used")

    def stream_ended(self, stream: int) -> None:
        raise AssertionError("not used")


def _result(request_id: str) -> pb.AgentMessage:
    return pb.AgentMessage(result=pb.CommandResult(request_id=request_id, ok=True,
                                                   vm_started=pb.VmStarted(uuid="u", already_running=False)))


def test_results_only_for_commands_sent_on_this_stream() -> None:
    servicer = AgentLinkServicer(NullHub(), LinkRegistry(lambda: 4.0))
    mine = AgentSession(host_id=HostId(1), uuid="a", peer="p1")
    other = AgentSession(host_id=HostId(2), uuid="b", peer="p2")
    mine.awaiting.add(RequestId("m1.1"))
    assert servicer._fact(_result("m1.1"), other) is None  # another host answering h1's command: dropped
    settled = servicer._fact(_result("m1.1"), mine)
    assert isinstance(settled, facts.CommandCompleted) and settled.ok and settled.request_id == "m1.1"
    assert servicer._fact(_result("m1.1"), mine) is None  # a replayed answer settles nothing twice
    assert servicer._fact(_result("m1.forged"), mine) is None


def test_neighbor_answers_carry_the_host_they_are_about() -> None:
    servicer = AgentLinkServicer(NullHub(), LinkRegistry(lambda: 4.0))
    session = AgentSession(host_id=HostId(1), uuid="a", peer="p1")
    session.awaiting.add(RequestId("m1.7"))
    session.neighbor_targets[RequestId("m1.7")] = HostId(3)
    message = pb.AgentMessage(result=pb.CommandResult(
        request_id="m1.7", ok=True, neighbor=pb.NeighborReport(tcp_reachable=False, icmp_checked=True,
                                                               icmp_reachable=False, heartbeat_found=True,
                                                               heartbeat_age_s=12.5)))
    fact = servicer._fact(message, session)
    assert isinstance(fact, facts.CommandCompleted) and isinstance(fact.payload, facts.NeighborCheck)
    assert (fact.payload.target_host_id, fact.payload.icmp_reachable, fact.payload.heartbeat_age_s) == (3, False, 12.5)
