"""The operator CLI's gRPC client: one channel per command, a deadline on every call, gRPC errors as exit codes.

Exit codes are part of the CLI's interface, so scripts can react without parsing messages:

    0  done
    1  any other error reported by the manager (INTERNAL, UNIMPLEMENTED, ...)
    2  the manager cannot be reached (UNAVAILABLE, or no connection before the deadline); also typer's usage errors
    3  no such host / VM / item (NOT_FOUND)
    4  the manager (or the CLI) refused the request (INVALID_ARGUMENT, FAILED_PRECONDITION, ALREADY_EXISTS, ...),
       or the caller (UNAUTHENTICATED: no operator certificate; PERMISSION_DENIED: a role too low for the request)
    5  connected, but no answer before the deadline: a change may or may not have been applied

Every error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import enum
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

import grpc
import typer
from google.protobuf.message import Message

from kvmha.proto.metadata import NOT_ACTIVE_KEY
from kvmha.proto.v1 import admin_pb2_grpc

DEFAULT_ADMIN_PORT = 50052

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


class Exit(enum.IntEnum):
    OK = 0
    ERROR = 1
    UNREACHABLE = 2
    NOT_FOUND = 3
    REFUSED = 4
    NO_ANSWER = 5


REFUSED_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


def fail(message: str, code: Exit) -> NoReturn:
    sys.stderr.write(f"kvmha: {message}\n")
    raise typer.Exit(int(code))


class Link:
    """One channel to a manager for the life of one command.

    Given several managers (they share one database; one holds the lease and acts, the others are standbys that
    answer reads), a call goes to the first; it moves on to the next only when nothing can have been applied: the
    manager was never reached (UNAVAILABLE, or no connection by the deadline), or it is a standby that refused a
    change (FAILED_PRECONDITION with the NOT_ACTIVE_KEY trailer, sent before it looked at the request)."""

    def __init__(self, addresses: list[str], timeout_s: float, open_channel: Callable[[str], grpc.Channel]) -> None:
        assert addresses, "at least one manager"
        self.addresses = addresses
        self.timeout_s = timeout_s
        self._open = open_channel
        self._at = 0
        self.address = addresses[0]
        self.channel = open_channel(self.address)
        self.stub = admin_pb2_grpc.AdminServiceStub(self.channel)
        self._watched = False  # whether grpc started its connectivity poller for this channel (see close)
        self._passed: list[str] = []  # managers tried before this one, and why they were left

    def _next_manager(self, err: grpc.RpcError) -> bool:
        """Move to the next manager if `err` proves the request was not applied and one is left."""
        if self._at + 1 >= len(self.addresses) or not isinstance(err, grpc.Call):
            return False
        code = err.code()
        standby = code is grpc.StatusCode.FAILED_PRECONDITION and any(
            key == NOT_ACTIVE_KEY for key, _ in (err.trailing_metadata() or ()))
        unreached = code is grpc.StatusCode.UNAVAILABLE or (
            code is grpc.StatusCode.DEADLINE_EXCEEDED and not self.is_connected())
        if not (standby or unreached):
            return False
        self._passed.append(f"{self.address}: {'a standby' if standby else 'unreachable'}")
        self.close()
        self._at += 1
        self.address = self.addresses[self._at]
        self.channel = self._open(self.address)
        self.stub = admin_pb2_grpc.AdminServiceStub(self.channel)
        self._watched = False
        return True

    def is_connected(self) -> bool:
        """Asked only after a deadline, to tell an unreachable manager from a slow one.

        Not a subscription kept for the whole command: that made every command 0.2 s slower to finish (measured)
        and exposes it to grpc's close race (see close)."""
        self._watched = True
        ready = grpc.channel_ready_future(self.channel)
        try:
            ready.result(timeout=0.25)
        except grpc.FutureTimeoutError:
            return False
        finally:
            ready.cancel()
        return True

    def call(self, rpc: grpc.UnaryUnaryMultiCallable[Req, Resp], request: Req) -> Resp:
        """`rpc` is a method of `self.stub` (e.g. `link.stub.StartVm`); on another manager, the same method."""
        name = next((key for key, value in vars(self.stub).items() if value is rpc), None)
        assert name is not None, "call() takes a method of this link's stub"
        while True:
            try:
                method: grpc.UnaryUnaryMultiCallable[Req, Resp] = getattr(self.stub, name)
                return method(request, timeout=self.timeout_s)
            except grpc.RpcError as err:
                if not self._next_manager(err):
                    self.fail(err)

    def stream(self, rpc: grpc.UnaryStreamMultiCallable[Req, Resp], request: Req) -> Iterator[Resp]:
        """The messages of a server stream. --timeout bounds connecting only: the stream lasts until cancelled."""
        call = rpc(request)
        try:
            self._await_connection(call)
            yield from call
        except grpc.RpcError as err:
            # We cancel only after the last read, so a CANCELLED seen here is the manager dropping the stream.
            if not (isinstance(err, grpc.Call) and err.code() is grpc.StatusCode.CANCELLED):
                self.fail(err)
        finally:
            # Also reached on Ctrl-C: tell the manager at once instead of leaving it a dead stream to notice.
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leave RpcContext.cancel untyped
        # Only Ctrl-C is meant to stop following: a stream the manager ends (shutting down, restarting) must not
        # look like success to a script that logs events.
        fail(f"the manager at {self.address} ended the stream (restarting?)", Exit.UNREACHABLE)

    def _await_connection(self, call: grpc.CallIterator[Resp]) -> None:
        settled = threading.Event()  # connected, or the call already ended (its error is raised by iterating)

        def watch(state: grpc.ChannelConnectivity) -> None:
            if state is grpc.ChannelConnectivity.READY:
                settled.set()

        self._watched = True
        self.channel.subscribe(watch)
        if not call.add_callback(settled.set):
            settled.set()
        try:
            if not settled.wait(self.timeout_s):
                self.unreachable(f"no connection within {self.timeout_s:g} s")
        finally:
            self.channel.unsubscribe(watch)

    def fail(self, err: grpc.RpcError) -> NoReturn:
        code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (err.details() if isinstance(err, grpc.Call) else None) or str(code.value[1])
        if code is grpc.StatusCode.UNAVAILABLE:
            self.unreachable(details)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            if not self.is_connected():
                self.unreachable(f"no connection within {self.timeout_s:g} s")
            fail(
                f"the manager at {self.address} did not answer within {self.timeout_s:g} s (--timeout); "
                "the request may or may not have been applied",
                Exit.NO_ANSWER,
            )
        if code is grpc.StatusCode.NOT_FOUND:
            fail(details, Exit.NOT_FOUND)
        if code in REFUSED_CODES:
            standby = any(key == NOT_ACTIVE_KEY for key, _ in (err.trailing_metadata() or ())) \
                if isinstance(err, grpc.Call) else False
            hint = (" (give the lease holder's admin address, or several: --manager ADDR,ADDR or KVMHA_MANAGER)"
                    if standby else "")
            fail(f"{details}{hint}", Exit.REFUSED)
        if code is grpc.StatusCode.UNIMPLEMENTED:
            fail(f"the manager at {self.address} does not implement this request (older version?)", Exit.ERROR)
        fail(f"the manager answered {code.name}: {details}", Exit.ERROR)

    def unreachable(self, reason: str) -> NoReturn:
        before = f" (before it: {'; '.join(self._passed)})" if self._passed else ""
        fail(
            f"cannot reach the manager at {self.address}: {reason}{before} "
            "(set the address with --manager or KVMHA_MANAGER)",
            Exit.UNREACHABLE,
        )

    def close(self) -> None:
        # Closing a channel while grpc's connectivity poller is in its 0.2 s wait kills that thread with a traceback
        # on stderr (a grpc race). Once unsubscribed the poller ends by itself, and the CLI process is exiting.
        if not self._watched:
            self.channel.close()


@dataclass(frozen=True)
class TlsFiles:
    """The CA that signed the manager's certificate, and the operator's own certificate and key."""

    ca: Path | None
    cert: Path | None
    key: Path | None


def connect(address: str, timeout_s: float, tls: TlsFiles | None = None) -> Link:
    """The only place a channel is built: mutual TLS when given the CA (and, for the admin API, the operator's
    certificate: `kvmha pki operator`).

    Plaintext otherwise, which a manager accepts only when it was explicitly started without TLS.
    """
    addresses = [with_port(part.strip()) for part in address.split(",") if part.strip()]
    if not addresses:
        fail("no manager address (--manager HOST[:PORT][,HOST[:PORT]...] or KVMHA_MANAGER)", Exit.REFUSED)
    if tls is None or tls.ca is None:
        if tls is not None and (tls.cert or tls.key):
            fail("--cert/--key need --tls-ca (KVMHA_TLS_CA): the CA that signed the manager's certificate",
                 Exit.REFUSED)
        return Link(addresses, timeout_s, grpc.insecure_channel)
    if bool(tls.cert) != bool(tls.key):
        fail("--cert and --key go together (KVMHA_TLS_CERT, KVMHA_TLS_KEY)", Exit.REFUSED)
    files = {"CA certificate": tls.ca, "certificate": tls.cert, "key": tls.key}
    data: dict[str, bytes | None] = {}
    for what, path in files.items():
        try:
            data[what] = path.read_bytes() if path is not None else None
        except OSError as err:
            fail(f"cannot read the {what} {path}: {err.strerror}", Exit.REFUSED)
    credentials = grpc.ssl_channel_credentials(root_certificates=data["CA certificate"], private_key=data["key"],
                                               certificate_chain=data["certificate"])
    return Link(addresses, timeout_s, lambda target: grpc.secure_channel(target, credentials))


def with_port(address: str) -> str:
    """'mgr1' means the admin port on mgr1; gRPC alone would try 443. Targets with a scheme are left alone."""
    return address if ":" in address else f"{address}:{DEFAULT_ADMIN_PORT}"
