"""Filling free pooled memory between requests, on real agents: the experts no agent holds are
read into free memory (never evicting), each on one agent, and on its owner under static expert
parallelism; `--no-fill` and `naive` leave the memory empty."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from node_agent.model.config import MoeConfig
from protos.convert import expert_batch_to_proto, expert_from_wire, expert_result_from_proto, expert_to_wire
from protos.ids import ExpertId
from protos.messages import ExpertBatch
from protos.potluck.v1 import agent_pb2_grpc as pb_grpc
from protos.routing import RoutingTable
from scheduler.policy import Policy
from scheduler.engine_settings import EngineSettings
from scheduler.service import EngineService, start_engine
from scheduler.types import AgentSnapshot, GenerationRequest, RequestId, SamplingParams
from tests.integration.cluster import Cluster, expert_bytes, local_cluster

AGENTS = 2


async def settle(cluster: Cluster, covered: bool = False, timeout_s: float = 30.0) -> list[AgentSnapshot]:
    """Snapshots once no agent has a read queued or under way (and, with covered, once every
    routed expert is on some agent): judged from the same reply as the counters, so that no read
    can begin or end between the two."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = [await c.cache_state() for c in cluster.clients]
        snaps = [c.snapshot_of(s) for c, s in zip(cluster.clients, states)]
        idle = not any(s.loading for s in states)
        if idle and (not covered or set().union(*(held(cluster, s) for s in snaps)) == routed(cluster)):
            return snaps
        assert time.monotonic() < deadline, f"still reading (or not covered) after {timeout_s} s"
        await asyncio.sleep(0.05)


def routed(cluster: Cluster) -> set[ExpertId]:
    shape = cluster.shape
    return {ExpertId(layer, e) for layer in range(shape.num_layers) if layer not in shape.dense_layers
            for e in range(shape.num_experts)}


def held(cluster: Cluster, snap: AgentSnapshot) -> set[ExpertId]:
    E = cluster.shape.num_experts
    return {expert_from_wire(i, E) for i in snap.held}


@pytest.mark.parametrize("name", ["sirius", "expert-parallel", "sirius --no-fill", "naive"])
async def test_fill_reads_what_no_agent_holds_into_free_memory(qwen_tiny: Path, name: str) -> None:
    policy = Policy.from_flags(name.split()[0], no_fill="--no-fill" in name)
    size = expert_bytes(qwen_tiny)
    async with local_cluster(qwen_tiny, AGENTS) as probe:
        total = len(routed(probe))
    capacity = total // AGENTS + 2  # the pool holds the whole model, with room to spare
    async with local_cluster(qwen_tiny, AGENTS, expert_memory=capacity * size, disk_rate=50 * size) as cluster:
        ids = torch.randint(0, 1000, (48,), generator=torch.Generator().manual_seed(3)).tolist()
        runner = cluster.runner(policy)
        await runner.run_step("p", policy.partition(ids, list(runner.agents)))  # the next token's logits only
        await runner.release("p", list(runner.agents))
        engine = EngineService(qwen_tiny, cluster.specs, EngineSettings(credentials=cluster.enrolment.server), policy)
        try:
            await engine.poll()
            before = await settle(cluster)
            missing = routed(cluster) - set().union(*(held(cluster, s) for s in before))
            assert missing  # the last layer ran the final token only: most of its experts were never read
            await engine.fill()
            after = await settle(cluster)
        finally:
            await engine.stop()
        now = [held(cluster, s) for s in after]
        fills = sum(s.fills for s in after) - sum(s.fills for s in before)
        assert [s.evictions for s in after] == [s.evictions for s in before]  # a fill never evicts
        assert all(s.bytes_used <= s.capacity_bytes for s in after)
        if not policy.fill:
            assert fills == 0 and set().union(*now) == routed(cluster) - missing
            return
        assert set().union(*now) == routed(cluster)  # every expert is now on some agent
        assert fills == len(missing)  # each missing expert was read once, on one agent
        if policy.name == "expert-parallel":  # on its owner: agent i of the sorted names owns a fixed 1/N
            E = cluster.shape.num_experts
            for i, experts in enumerate(now):
                assert {e.index * AGENTS // E for e in experts} == {i}


async def test_engine_fills_after_each_request(qwen_tiny: Path) -> None:
    """Wired in: after a request ends, the engine asks the agents to fill, and a second request on
    the filled pool, prefill and decode, reads nothing from disk: a decode step's experts run on
    the agents that hold them, though only one agent has the new token."""
    size = expert_bytes(qwen_tiny)
    async with local_cluster(qwen_tiny, AGENTS) as probe:
        total = len(routed(probe))
    async with local_cluster(qwen_tiny, AGENTS, expert_memory=total * size, disk_rate=50 * size) as cluster:
        # Sequence-parallel prefill (home_prefill_max=0): every agent computes and reads.
        settings = EngineSettings(poll_interval_s=60, home_prefill_max=0, credentials=cluster.enrolment.server)
        engine = await start_engine(qwen_tiny, cluster.specs, settings, "sirius")
        try:
            for i in range(2):
                if i == 1:
                    before = await settle(cluster, covered=True)  # the fill the engine asked for is done
                ids = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(10 + i)).tolist()
                request = GenerationRequest(RequestId(f"r{i}"), tuple(ids), SamplingParams(max_tokens=4, temperature=0))
                events = [e async for e in await engine.submit(request)]
                assert len(events) == 4
            after = await settle(cluster)
        finally:
            await engine.stop()
        # The second request runs each expert where it is held: the last layer's experts, which a
        # prefill reads for its final token only, are there too. No read waits on the disk; the
        # only reads are the home's copies, into its free memory, of experts its decode steps ran
        # on a holder.
        assert [s.misses for s in after] == [s.misses for s in before]
        for a, b in zip(after, before):
            whole = (a.fills - b.fills + a.prefetches - b.prefetches) * size
            # A fill stopped part-way for an urgent read (a busy machine makes that likely) is read
            # again from the start: what it had read counts twice, at most one expert per stop.
            partial = a.bytes_read - b.bytes_read - whole
            assert 0 <= partial <= (a.fill_preemptions - b.fill_preemptions) * size, (a, b)
        assert sum(s.decode_remote_experts for s in after) > 0


async def test_a_full_agent_drops_a_second_copy_before_the_pools_only_one(qwen_tiny: Path) -> None:
    """Two agents whose memory holds the model once hold every expert but one, whose room a
    second copy takes. Asked to run the missing expert, the full agent reads it and drops its
    copy of the one the routing table names on the other agent too, though its policy would
    drop another first: the pool then holds every expert, where dropping the policy's choice
    would leave that one on no agent, to be read again by whoever needs it next."""
    async with local_cluster(qwen_tiny, AGENTS) as probe:
        experts = sorted(routed(probe))
    E, half = probe.shape.num_experts, len(experts) // AGENTS
    mine, missing, theirs = experts[:half], experts[half], experts[half + 1:]
    policy_first = ExpertId(0, 0)  # the least recently read, of the layer the agent needs last
    copy = ExpertId(missing.layer, 0)  # of the layer being read: the policy would drop it last
    assert {copy, policy_first} <= set(mine) and len(theirs) + 1 == half
    async with local_cluster(qwen_tiny, AGENTS, expert_memory=half * expert_bytes(qwen_tiny)) as cluster:
        for client, share in zip(cluster.clients, (mine, [*theirs, copy])):
            await client.fill([expert_to_wire(e, E) for e in share])
        before = await settle(cluster)
        assert [held(cluster, s) for s in before] == [set(mine), {*theirs, copy}]
        holders = {e: tuple(s.name for s in before if e in held(cluster, s)) for e in experts}
        table = RoutingTable(version=1, addresses={s.name: s.address for s in cluster.specs},
                             holders={e: h for e, h in holders.items() if h})
        for client in cluster.clients:
            await client.set_routing_table(table, E)
        hidden = MoeConfig.load(qwen_tiny).hidden_size
        batch = ExpertBatch(request_id="decode", layer=missing.layer, hidden=torch.randn(1, hidden),
                            expert_ids=torch.tensor([[missing.index]], dtype=torch.int32),
                            weights=torch.ones(1, 1), decode=True)
        async with cluster.enrolment.channel(cluster.specs[0]) as channel:
            out = expert_result_from_proto(await pb_grpc.NodeAgentStub(channel).RunExperts(expert_batch_to_proto(batch)))
        assert out.shape == (1, hidden)
        after = await settle(cluster)
    assert held(cluster, after[0]) == set(mine) - {copy} | {missing}
    assert set().union(*(held(cluster, s) for s in after)) == set(experts)
    assert after[0].evictions - before[0].evictions == 1


async def test_the_engine_reads_what_no_agent_holds_in_place_of_a_second_copy(qwen_tiny: Path) -> None:
    """Wired in: two full agents whose memory holds the model once, one expert on both and one
    on neither. After a request the engine's fill has one of them give its copy up and read the
    missing expert: every expert is then on exactly one agent."""
    async with local_cluster(qwen_tiny, AGENTS) as probe:
        experts = sorted(routed(probe))
    E, half = probe.shape.num_experts, len(experts) // AGENTS
    mine, missing, theirs = experts[:half], experts[half], experts[half + 1:]
    async with local_cluster(qwen_tiny, AGENTS, expert_memory=half * expert_bytes(qwen_tiny)) as cluster:
        for client, share in zip(cluster.clients, (mine, [*theirs, mine[0]])):
            await client.fill([expert_to_wire(e, E) for e in share])
        before = await settle(cluster)
        assert missing not in set().union(*(held(cluster, s) for s in before))
        engine = EngineService(qwen_tiny, cluster.specs, EngineSettings(credentials=cluster.enrolment.server), Policy())
        try:
            await engine.poll()
            assert engine.snapshot().unheld_experts == 1  # potluck_experts_unheld
            await engine.fill()
            after = await settle(cluster, covered=True)
            await engine.poll()
            assert engine.snapshot().unheld_experts == 0
        finally:
            await engine.stop()
    now = [held(cluster, s) for s in after]
    assert set().union(*now) == set(experts) and sum(map(len, now)) == len(experts)
    assert sum(s.evictions for s in after) - sum(s.evictions for s in before) == 1
