"""A placement sent to a real agent (SetPlacement over mutual-TLS gRPC): the agent reads the
placed experts (or fetches them from a peer's memory, falling back to its disk where the peer
lacks one), keeps them through demand traffic that cycles its cache, reports them in its cache
state, and the scheduler's routing table names it as their holder; a placement that names
experts the model lacks or leaves no slot to the cache is refused with INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import dataclasses
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


def _request(rid: str, first: int, user: str | None = None) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=frozenset())
    return GenerationRequest(RequestId(rid), tuple(range(first + 3, first + 30)), sampling, user)


async def test_a_placement_the_agent_cannot_take_is_refused(qwen_tiny: Path) -> None:
    async with local_cluster(qwen_tiny, 1, expert_memory=3 * expert_bytes(qwen_tiny)) as cluster:
        agent, n = cluster.clients[0], cluster.shape.num_experts
        with pytest.raises(AgentFailed, match="does not fit") as too_many:
            await agent.set_placement([expert_to_wire(ExpertId(0, e), n) for e in range(3)])
        assert too_many.value.code == "INVALID_ARGUMENT"
        with pytest.raises(AgentFailed, match="not a routed expert") as unknown:
            await agent.set_placement([cluster.shape.num_layers * n + 5])
        assert unknown.value.code == "INVALID_ARGUMENT"


async def test_a_placed_expert_comes_from_a_peers_memory_or_else_from_disk(qwen_tiny: Path) -> None:
    async with local_cluster(qwen_tiny, 2, expert_memory=6 * expert_bytes(qwen_tiny)) as cluster:
        n = cluster.shape.num_experts
        holder, target = cluster.clients
        held = [ExpertId(0, 2), ExpertId(1, 5)]
        await holder.set_placement([expert_to_wire(e, n) for e in held])
        await until_placed(holder, {expert_to_wire(e, n) for e in held})
        before = (await target.cache_state()).counters.bytes_read
        # Fetched from the holder: the target's disk reads nothing for them.
        wire = {expert_to_wire(e, n) for e in held}
        await target.set_placement(sorted(wire), [(w, holder.name, holder.spec.address) for w in sorted(wire)])
        await until_placed(target, wire)
        assert (await target.cache_state()).counters.bytes_read == before
        # A source that does not hold the expert: read from the target's disk instead.
        missing = expert_to_wire(ExpertId(2, 1), n)
        await target.set_placement(sorted(wire | {missing}), [(missing, holder.name, holder.spec.address)])
        await until_placed(target, wire | {missing})
        assert (await target.cache_state()).counters.bytes_read > before
        async with cluster.engine() as engine:  # the fetched copies compute what the files give
            want = [e.token_id async for e in await engine.submit(_request("ref", 0))]
        cluster.specs = [dataclasses.replace(s, users=("u",)) if s.name == target.name else s for s in cluster.specs]
        async with cluster.engine() as engine:
            got = [e.token_id async for e in await engine.submit(_request("fetched", 0, user="u"))]
        assert got == want
