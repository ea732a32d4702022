"""Peer identities on gRPC calls and the admin roles interceptor: the one place the admin API is authorised.

Invariants:
- With TLS the manager requires a client certificate signed by its CA (the handshake refuses any other), so an
  identity read here was verified by the TLS layer; it is read from the certificate's URI SANs (pki.identity_of).
- An admin call runs only when its RPC is in roles.RPC_ROLES and the caller's role allows it; everything else is
  refused before the servicer sees the request (UNAUTHENTICATED without a role, PERMISSION_DENIED when too low).
- Plaintext (explicitly allowed, loudly logged) has no identities: its callers get `plaintext_role`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from kvmha.manager.security.pki import Identity, identity_of
from kvmha.manager.security.roles import Role, required_role

log = logging.getLogger("kvmha.manager.security")
Context = grpc.aio.ServicerContext[Any, Any]


def peer_identity(context: Context) -> Identity | None:
    """The verified certificate identity of the caller; None on plaintext or without a client certificate."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return None
    try:
        return identity_of(bytes(next(iter(pems))))
    except ValueError:
        return None


def server_credentials(cert: Path, key: Path, ca: Path) -> grpc.ServerCredentials:
    """Mutual TLS: the server's certificate, and only clients with a certificate from `ca`."""
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())], root_certificates=ca.read_bytes(),
                                       require_client_auth=True)


def channel_credentials(ca: Path, cert: Path | None, key: Path | None) -> grpc.ChannelCredentials:
    """The client side: trust only `ca`, present our certificate."""
    chain = cert.read_bytes() if cert else None
    private = key.read_bytes() if key else None
    return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes(), private_key=private,
                                        certificate_chain=chain)


class Denied(Exception):
    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status = status


def authorize(method: str, identity: Identity | None, plaintext_role: Role | None) -> Role:
    """The caller's role if it may call `method`; raises Denied otherwise. Pure: tested by walking the table."""
    needed = required_role(method)
    if needed is None:
        raise Denied(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not an admin call this manager allows")
    held = identity.role if identity is not None else plaintext_role
    if held is None:
        who = "no client certificate" if identity is None else f"certificate {identity.common_name!r} has no role"
        raise Denied(grpc.StatusCode.UNAUTHENTICATED, f"{who}: an operator certificate is needed "
                                                      "(kvmha pki operator NAME --role ...)")
    if not held.allows(needed):
        raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                     f"{method.rsplit('/', 1)[-1]} needs the {needed.value} role; "
                     f"{identity.common_name if identity else 'this caller'!s} has {held.value}")
    return held


class RoleInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every admin handler with `authorize` (unary and server-streaming calls: what AdminService has)."""

    def __init__(self, plaintext_role: Role | None = None) -> None:
        self._plaintext_role = plaintext_role

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        check = self._check
        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary  # an async callable on grpc.aio (the stubs type the sync API)

            async def unary(request: Any, context: Context) -> Any:
                await check(method, context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream is not None:
            stream: Any = handler.unary_stream

            async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
                await check(method, context)
                async for item in stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(streaming, handler.request_deserializer,
                                                        handler.response_serializer)
        return _refusing(method)

    async def _check(self, method: str, context: Context) -> None:
        identity = peer_identity(context)
        try:
            authorize(method, identity, self._plaintext_role)
        except Denied as denied:
            log.warning("event=admin_denied method=%s peer=%s who=%s status=%s reason=%s", method, context.peer(),
                        identity.common_name if identity else "-", denied.status.name, denied)
            await context.abort(denied.status, str(denied))


def _refusing(method: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def refuse(_request: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not allowed")

    return grpc.unary_unary_rpc_method_handler(refuse)
