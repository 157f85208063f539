"""Calls waiting on agents, abandoned at once when one of those agents is declared down.

A stopped agent (SIGSTOP, a laptop's lid closed) keeps its TCP connections open: a call to it
hung for about a minute before gRPC's transport gave up, and the batching loop with it. The
scheduler makes each call through `on`, naming the agents it depends on; `abandon(name)`
cancels those calls, which then raise AgentFailed naming the agent.

    calls = AgentCalls()
    result = await calls.on([home.name], home.decode_step(spans))   # elsewhere: calls.abandon(name)
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from scheduler.errors import AgentFailed
from scheduler.types import NodeId

T = TypeVar("T")


class AgentCalls:
    def __init__(self) -> None:
        self._waiting: dict[NodeId, set[asyncio.Future[Any]]] = {}  # calls waiting on each agent
        self._abandoned: dict[NodeId, set[asyncio.Future[Any]]] = {}  # those `abandon` cancelled, by agent

    async def on(self, agents: Sequence[NodeId], call: Coroutine[Any, Any, T]) -> T:
        """`call`'s result; AgentFailed at once if one of `agents` is abandoned meanwhile,
        rather than when the call fails on its own."""
        future = asyncio.ensure_future(call)
        for name in agents:
            self._waiting.setdefault(name, set()).add(future)
        try:
            return await future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not future.cancelled() or (task is not None and task.cancelling()):
                raise  # the caller was cancelled, not the call
            down = next((n for n in agents if future in self._abandoned.get(n, ())), agents[0])
            raise AgentFailed(f"agent {down} is down; the call waiting on it was abandoned", down) from None
        finally:
            for name in agents:
                self._waiting.get(name, set()).discard(future)
                self._abandoned.get(name, set()).discard(future)

    def abandon(self, name: NodeId) -> None:
        """Cancel every call waiting on `name`."""
        calls = self._waiting.pop(name, set())
        self._abandoned[name] = calls
        for call in calls:
            call.cancel()
