"""Work that starts before the layer's plan: an agent runs its own tokens through the experts it
holds as soon as its router has run, and sends its tokens of the experts the scheduler routed
ahead (direct routes) straight to their executors. The plan decides whether early work is used
and keeps direct routes; either way the logits stay transformers' (real agents over real gRPC)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


from scheduler.cost_model import AgentProfile, CostModel
from scheduler.policy import Policy
from scheduler.runner import RequestRunner
from scheduler.types import AgentSnapshot, LayerReport, NodeId, RoutingPlan
from tests.integration.cluster import Cluster, expert_bytes, local_cluster
from tests.integration.test_equivalence import ATOL, prompt, reference


Case = tuple[list[int], torch.Tensor]  # prompt ids, transformers' logits for every position


@pytest.fixture
def case(qwen_tiny: Path) -> Case:
    ref = reference(qwen_tiny)
    ids = prompt(ref.config.vocab_size, n=48)
    with torch.no_grad():
        return ids, ref(torch.tensor([ids])).logits[0]


async def matches(runner: RequestRunner, request_id: str, case: Case) -> bool:
    """Whether the runner's prefill logits equal transformers' (within ATOL)."""
    ids, expected = case
    return bool((await runner.prefill_logits(request_id, ids) - expected).abs().max().item() <= ATOL)


async def snapshots(cluster: Cluster) -> list[AgentSnapshot]:
    return [await c.snapshot() for c in cluster.clients]


async def early(cluster: Cluster) -> tuple[int, int]:
    snaps = await snapshots(cluster)
    return sum(s.early_used for s in snaps), sum(s.early_dropped for s in snaps)


async def direct_sent(cluster: Cluster) -> int:
    return sum(s.direct_sent for s in await snapshots(cluster))


async def test_early_expert_runs_are_used_where_the_plan_agrees_and_dropped_where_it_does_not(qwen_tiny: Path, case: Case) -> None:
    async with local_cluster(qwen_tiny, 2) as cluster:
        naive = cluster.runner(Policy.from_flags("naive"))
        # Cold: nothing is resident when the routers run, so there is nothing to start early.
        assert await matches(naive, "cold", case)
        assert await early(cluster) == (0, 0)

        # Warm, naive: each agent runs its own tokens' experts, which it now holds: the plan agrees.
        assert await matches(naive, "warm", case)
        used, dropped = await early(cluster)
        assert used > 0 and dropped == 0

        # Expert-parallel: agent i runs only its half of each layer's experts, so the early runs of
        # the other half (it holds them all by now) are overruled and those of its own half used.
        assert await matches(cluster.runner(Policy.from_flags("expert-parallel")), "split", case)
        used_after, dropped_after = await early(cluster)
        assert dropped_after > 0 and used_after > used


async def test_warm_requests_send_tokens_by_direct_routes_and_keep_the_logits(qwen_tiny: Path, case: Case) -> None:
    # Reads must cost time: on an unlimited disk a second copy is free, so the plans may split any
    # expert by the agents' measured (noisy) compute speeds and no expert need have one holder.
    size = expert_bytes(qwen_tiny)
    async with local_cluster(qwen_tiny, 3, disk_rate=50 * size) as cluster:
        runner = cluster.runner(Policy())
        assert await matches(runner, "cold", case)
        cold = await direct_sent(cluster)
        # Warm: each expert the prompt uses is held by the one agent that ran it cold, so every
        # owner sends those tokens there as soon as its router has run.
        assert await matches(runner, "warm", case)
        assert await direct_sent(cluster) > cold
        # Without prediction there is no guessed plan, so no direct route either.
        before = await direct_sent(cluster)
        assert await matches(cluster.runner(Policy.from_flags("sirius", no_prefetch=True)), "plain", case)
        assert await direct_sent(cluster) == before


@dataclass(frozen=True)
class Misrouting(Policy):
    """Direct routes that ignore where the experts are: expert e to the e-th agent (mod N), as a
    stale guess would. The executors read what they lack, and the plans keep the routes."""

    def direct_routes(self, layer: int, reports: Sequence[LayerReport], profiles: Mapping[NodeId, AgentProfile],
                      cost: CostModel, num_experts: int, prefetch: Mapping[NodeId, Sequence[int]],
                      guess: RoutingPlan | None = None) -> dict[int, NodeId]:
        nodes = sorted(r.node for r in reports)
        return {e: nodes[e % len(nodes)] for e in range(num_experts)}


async def test_direct_routes_to_agents_without_the_expert_still_give_transformers_logits(qwen_tiny: Path, case: Case) -> None:
    async with local_cluster(qwen_tiny, 3) as cluster:
        runner = cluster.runner(Policy())
        assert await matches(runner, "cold", case)
        loads = sum(s.loads for s in await snapshots(cluster))
        assert await matches(cluster.runner(Misrouting()), "misrouted", case)
        snaps = await snapshots(cluster)
        assert sum(s.direct_sent for s in snaps) > 0
        assert sum(s.loads for s in snaps) > loads  # the routes' executors read experts they lacked
