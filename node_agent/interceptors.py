"""gRPC server interceptors of the agent: agent exceptions become status codes (a failed peer
named in the trailing metadata), and replies wait out the emulated link latency."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from node_agent.peers import Link, PeerFailed
from node_agent.state import RequestReleased, UnknownRequest
from protos.convert import failed_agent_to_metadata

log = logging.getLogger("potluck.agent")


def _peer_failure(exc: BaseException) -> PeerFailed | None:
    """The peer failure at the root of `exc`, if any (an error raised `from` one counts)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, PeerFailed):
            return cause
        cause = cause.__cause__
    return None


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The one place where agent exceptions become gRPC status codes. A call to a peer that failed
    is UNAVAILABLE, with the peer in the trailing metadata: the caller names it, not this agent."""

    CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
        (UnknownRequest, grpc.StatusCode.NOT_FOUND),
        (RequestReleased, grpc.StatusCode.CANCELLED),
        (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
        (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    )

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def guarded(request: Any, context: Any) -> Any:
            try:
                return await inner(request, context)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                peer = _peer_failure(exc)
                if peer is not None:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{type(exc).__name__}: {exc}",
                                        failed_agent_to_metadata(peer.peer, peer.address))
                code = next((c for t, c in self.CODES if isinstance(exc, t)), grpc.StatusCode.INTERNAL)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", details.method)
                await context.abort(code, f"{type(exc).__name__}: {exc}")

        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


class LatencyInterceptor(grpc.aio.ServerInterceptor):
    """Delays every unary NodeAgent reply by the link latency, after the handler computed it
    (whose `Link.send` already paced its bytes). Health checks are not delayed: they are the
    launcher's probe, not the emulated device's traffic."""

    SERVICE = "/potluck.v1.NodeAgent/"

    def __init__(self, link: Link) -> None:
        self.link = link

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if (handler is None or handler.unary_unary is None or not self.link.latency_s
                or not details.method.startswith(self.SERVICE)):
            return handler
        inner = handler.unary_unary

        async def delayed(request: Any, context: Any) -> Any:
            reply = await inner(request, context)
            await self.link.delay()
            return reply

        return grpc.unary_unary_rpc_method_handler(
            delayed, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
