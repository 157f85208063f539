"""What the server sees of the scheduler: an `Engine` that queues and runs generation requests.

    events = await engine.submit(request)   # raises QueueFull, NoAgentsAvailable, PromptTooLong
    async for event in events: ...           # TokenEvent per generated token; AgentFailed mid-way
    await events.aclose()                    # stop early (stop string, client gone): the request's
                                             # work is cancelled and released on every agent
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from scheduler.types import EngineSnapshot, GenerationRequest, NodeSpec, TokenEvent


class Engine(Protocol):
    @property
    def context_length(self) -> int:
        """Tokens the model can attend to: prompt + generated must fit."""
        ...

    async def submit(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Queue a request; the returned iterator yields its tokens as they are sampled."""
        ...

    def snapshot(self) -> EngineSnapshot:
        """Queue depths and the last state heard from every agent (cheap; no I/O)."""
        ...

    def activation_stats(self) -> dict[str, Any]:
        """The activation window per home agent, layer and expert, as JSON (`GET /admin/stats`)."""
        ...

    async def replan(self) -> dict[str, Any]:
        """Re-plan the expert placement now; the placement report (`POST /admin/replan`)."""
        ...

    def placement_report(self) -> dict[str, Any]:
        """Per agent and MoE layer its pinned and cached experts; the last replan (`GET /admin/placement`)."""
        ...

    def set_nodes(self, nodes: Sequence[NodeSpec]) -> str:
        """A new inventory's nodes: joins, drains and label changes, without a restart; what changed."""
        ...
