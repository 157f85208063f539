"""A placement sent to a real agent (SetPlacement over mutual-TLS gRPC): the agent reads the
placed experts, keeps them through demand traffic that cycles its cache, reports them in its
cache state, and the scheduler's routing table names it as their holder; a placement that names
experts the model lacks or leaves no slot to the cache is refused with INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from protos.convert import expert_to_wire
from protos.ids import ExpertId, RequestId
from scheduler.client import AgentClient
from scheduler.errors import AgentFailed
from scheduler.types import GenerationRequest, SamplingParams
from tests.integration.cluster import expert_bytes, local_cluster


async def until_placed(client: AgentClient, wanted: set[int], timeout_s: float = 30.0) -> None:
    """Until the agent reports every placed expert resident (its reads run in the background)."""
    async with asyncio.timeout(timeout_s):
        while True:
            state = await client.cache_state()
            if wanted <= state.resident:
                return
            await asyncio.sleep(0.05)


async def test_placed_experts_are_read_kept_and_routed_to(qwen_tiny: Path) -> None:
    async with local_cluster(qwen_tiny, 2, expert_memory=4 * expert_bytes(qwen_tiny)) as cluster:
        n = cluster.shape.num_experts
        agent = cluster.clients[1]
        placed = [ExpertId(0, 1), ExpertId(1, 3), ExpertId(2, 0)]
        wire = {expert_to_wire(e, n) for e in placed}
        assert (await agent.set_placement(sorted(wire)))[0] == 3
        await until_placed(agent, wire)
        state = await agent.cache_state()
        assert state.placed == wire
        async with cluster.engine() as engine:
            await engine.refresh()
            assert all(cluster.specs[1].name in engine.table.holders.get(e, ()) for e in placed)
            # Requests whose other experts take turns in the one slot left to the cache.
            for i in range(3):
                req = GenerationRequest(RequestId(f"r{i}"), tuple(range(5 + i, 30 + i)),
                                        SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=frozenset()))
                assert len([e async for e in await engine.submit(req)]) == 4
            await engine.refresh()  # the agents' counters as of now
            evictions = sum(s.evictions for s in engine.snapshot().agents)
        state = await agent.cache_state()
        assert wire <= state.resident and state.placed == wire
        assert evictions > 0  # the cache did cycle around the placement


async def test_a_placement_the_agent_cannot_take_is_refused(qwen_tiny: Path) -> None:
    async with local_cluster(qwen_tiny, 1, expert_memory=3 * expert_bytes(qwen_tiny)) as cluster:
        agent, n = cluster.clients[0], cluster.shape.num_experts
        with pytest.raises(AgentFailed, match="does not fit") as too_many:
            await agent.set_placement([expert_to_wire(ExpertId(0, e), n) for e in range(3)])
        assert too_many.value.code == "INVALID_ARGUMENT"
        with pytest.raises(AgentFailed, match="not a routed expert") as unknown:
            await agent.set_placement([cluster.shape.num_layers * n + 5])
        assert unknown.value.code == "INVALID_ARGUMENT"
