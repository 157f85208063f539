"""An agent runs its own tokens through the experts it holds as soon as its router has run, while
the scheduler still gathers the other reports; the plan decides whether that work is used, and
either way the logits stay transformers' (real agents over real gRPC)."""

from __future__ import annotations

from pathlib import Path

import torch

from scheduler.policy import Policy
from scheduler.types import AgentSnapshot
from tests.integration.cluster import Cluster, local_cluster
from tests.integration.test_equivalence import ATOL, prompt, reference


async def early(cluster: Cluster) -> tuple[int, int]:
    snaps: list[AgentSnapshot] = [await c.snapshot() for c in cluster.clients]
    return sum(s.early_used for s in snaps), sum(s.early_dropped for s in snaps)


async def test_early_expert_runs_are_used_where_the_plan_agrees_and_dropped_where_it_does_not(qwen_tiny: Path) -> None:
    ref = reference(qwen_tiny)
    ids = prompt(ref.config.vocab_size, n=48)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    async with local_cluster(qwen_tiny, 2) as cluster:
        naive = cluster.runner(Policy.from_flags("naive"))
        # Cold: nothing is resident when the routers run, so there is nothing to start early.
        assert (await naive.prefill_logits("cold", ids) - expected).abs().max().item() <= ATOL
        assert await early(cluster) == (0, 0)

        # Warm, naive: each agent runs its own tokens' experts, which it now holds: the plan agrees.
        assert (await naive.prefill_logits("warm", ids) - expected).abs().max().item() <= ATOL
        used, dropped = await early(cluster)
        assert used > 0 and dropped == 0

        # Expert-parallel: agent i runs only its half of each layer's experts, so the early runs of
        # the other half (it holds them all by now) are overruled and those of its own half used.
        logits = await cluster.runner(Policy.from_flags("expert-parallel")).prefill_logits("split", ids)
        assert (logits - expected).abs().max().item() <= ATOL
        used_after, dropped_after = await early(cluster)
        assert dropped_after > 0 and used_after > used
