"""gRPC server interceptors of the agent: callers and message sizes are checked before parsing, agent
exceptions become status codes (a failed peer named in the trailing metadata), and replies wait
out the emulated link latency."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from node_agent.expert_buffer import NotResident
from node_agent.limits import Overloaded
from node_agent.peers import Link, PeerFailed
from node_agent.state import RequestReleased, UnknownRequest
from protos.convert import failed_agent_to_metadata
from protos.security import SERVER_IDENTITY, agent_name, caller

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
        (NotResident, grpc.StatusCode.NOT_FOUND),
        (RequestReleased, grpc.StatusCode.CANCELLED),
        (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
        (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
        (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    )

    def _status(self, exc: Exception, method: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
        """The status, details and trailing metadata that answer a call which raised `exc`."""
        why = f"{type(exc).__name__}: {exc}"
        peer = _peer_failure(exc)
        if peer is not None:  # the peer's own code, unless it went away or hung: then UNAVAILABLE
            code = getattr(grpc.StatusCode, peer.code, grpc.StatusCode.UNAVAILABLE)
            if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
                code = grpc.StatusCode.UNAVAILABLE
            return code, why, failed_agent_to_metadata(peer.peer, peer.address)
        code = next((c for t, c in self.CODES if isinstance(exc, t)), grpc.StatusCode.INTERNAL)
        if code is grpc.StatusCode.INTERNAL:
            log.error("%s failed", method, exc_info=exc)
        return code, why, ()

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
                code, why, trailing = self._status(exc, details.method)
            # Aborted outside the handler of `exc`: the abort would otherwise chain to it, and its
            # traceback keeps the request alive (a refused 4 MB message kept its memory each time).
            del request
            await context.abort(code, why, trailing)

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


class GateInterceptor(grpc.aio.ServerInterceptor):
    """Before a request is even parsed: who calls (with TLS, from the caller's verified
    certificate, protos/security.py) and how large the message is.

    Control calls are served only to the server; the agent-to-agent calls (K/V transfers, expert
    batches) to the server or an enrolled agent. The TLS handshake has already refused anyone
    without a certificate from the cluster's CA; this refuses an agent posing as the server.
    Control messages are small (a step's token ids, plans, routing tables): one larger than
    `max_control_bytes` is refused unparsed. Parsing first cost memory that the process kept:
    16 refused BeginSteps of 4 MB each grew an agent by about 60 MB, every time. Health checks
    are open to any enrolled party."""

    SERVICE = "/potluck.v1.NodeAgent/"
    PEER_METHODS = frozenset({"PushKV", "Attend", "RunExperts", "FetchKV", "FetchExpert"})

    def __init__(self, secure: bool, max_control_bytes: int) -> None:
        self.secure = secure  # callers have certificates to check
        self.max_control_bytes = max_control_bytes

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or not details.method.startswith(self.SERVICE):
            return handler
        inner, parse = handler.unary_unary, handler.request_deserializer
        method = details.method[len(self.SERVICE):]
        peer_call = method in self.PEER_METHODS
        limit = None if peer_call else self.max_control_bytes

        async def gated(raw: bytes, context: Any) -> Any:
            who = caller(context) if self.secure else None
            if self.secure and who != SERVER_IDENTITY and not (peer_call and who is not None and agent_name(who)):
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"{method} is served only to the cluster's server"
                                    f"{' and agents' if peer_call else ''}; the caller's certificate names "
                                    f"{who or 'no potluck identity'}")
            if limit is not None and len(raw) > limit:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"a {method} message of {len(raw)} bytes exceeds this agent's limit of {limit}")
            try:
                request = parse(raw)
            except DecodeError as exc:
                request = None
                why = f"{method}: not a valid message: {exc}"
            del raw
            if request is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(gated, response_serializer=handler.response_serializer)
