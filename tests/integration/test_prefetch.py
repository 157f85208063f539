"""Speculative prefetch on real agents: it reads ahead, it is scored, and it changes no result."""

from __future__ import annotations

from pathlib import Path

import torch

from node_agent.model.synth import init_model
from scheduler.policy import Policy
from tests.integration.cluster import expert_bytes, local_cluster


async def run(model_dir: Path, policy: Policy) -> tuple[torch.Tensor, int, int, int, int, int]:
    """Prefill logits, and the agents' prefetches and recall counters: (experts predicted and
    used, experts used, pairs predicted and used, pairs used)."""
    size = expert_bytes(model_dir)
    async with local_cluster(model_dir, 2, expert_memory=6 * size) as cluster:
        ids = torch.randint(0, 1000, (96,), generator=torch.Generator().manual_seed(5)).tolist()
        logits = await cluster.runner(policy).prefill_logits("p", ids)
        snaps = [await c.snapshot() for c in cluster.clients]
        return (logits, sum(s.prefetches for s in snaps), sum(s.predicted_used for s in snaps),
                sum(s.used for s in snaps), sum(s.predicted_pairs_used for s in snaps), sum(s.pairs_used for s in snaps))


async def test_prefetch_reads_ahead_and_reports_recall(qwen_tiny: Path) -> None:
    with_logits, prefetches, hit, used, pair_hit, pairs = await run(qwen_tiny, Policy.from_flags("sirius"))
    assert prefetches > 0
    assert used > 0 and 0 < hit <= used  # recall = hit / used is defined and non-trivial
    assert pairs >= used and 0 < pair_hit <= pairs  # per (token, slot) pair too
    without_logits, no_prefetches, _, no_used, _, no_pairs = await run(qwen_tiny, Policy.from_flags("sirius", no_prefetch=True))
    assert no_prefetches == 0 and no_used == 0 and no_pairs == 0
    assert torch.allclose(with_logits, without_logits, atol=1e-5)


async def test_a_prefill_runs_the_last_layer_only_for_the_final_token(qwen_tiny: Path) -> None:
    """The next token depends on the last layer's MoE of the final position only, so that layer
    loads just the final token's top-k experts, and the sampled token is still transformers'."""
    async with local_cluster(qwen_tiny, 2) as cluster:
        runner = cluster.runner(Policy.from_flags("sirius"))
        ids = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(2)).tolist()
        plan = runner.policy.partition(ids, list(runner.agents))
        last_logits = await runner.run_step("p", plan)
        all_logits = await runner.run_step("q", runner.policy.partition(ids, list(runner.agents)), all_logits=True)
        assert torch.allclose(last_logits[-1], all_logits[-1], atol=1e-5)
        await runner.release("p", list(runner.agents))
        await runner.release("q", list(runner.agents))
    async with local_cluster(qwen_tiny, 2) as cluster:
        runner = cluster.runner(Policy.from_flags("sirius", no_prefetch=True))
        await runner.run_step("r", runner.policy.partition(ids, list(runner.agents)))
        layers, experts = cluster.shape.num_layers, cluster.shape.num_experts
        last_layer = {i % experts for c in cluster.clients for i in await c.resident() if i // experts == layers - 1}
        assert 1 <= len(last_layer) <= 2  # top-2 of one token, where earlier layers used many more
        first_layer = {i % experts for c in cluster.clients for i in await c.resident() if i // experts == 0}
        assert len(first_layer) > 2


async def test_pair_recall_is_counted_per_token_and_can_miss(tmp_path: Path) -> None:
    """Many experts and short prompts, where a prediction misses: every (token, slot) pair of a
    layer with a prediction is counted once, and the share predicted is below 1."""
    model_dir = init_model("qwen3_moe", tmp_path / "e32", "tiny", experts=32, seed=11)
    lengths = (4, 8, 16)
    async with local_cluster(model_dir, 2) as cluster:
        for n in lengths:
            ids = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(5)).tolist()
            await cluster.runner(Policy.from_flags("sirius")).prefill_logits(f"p{n}", ids)
        snaps = [await c.snapshot() for c in cluster.clients]
    pairs, pair_hit = sum(s.pairs_used for s in snaps), sum(s.predicted_pairs_used for s in snaps)
    # Every layer has a prediction (layer 0's from the embeddings); all logits: every token runs
    # the last layer too. Tiny preset: 3 layers, top-2.
    assert pairs == 3 * 2 * sum(lengths)
    assert 0 < pair_hit < pairs
    assert 0 < sum(s.predicted_used for s in snaps) < sum(s.used for s in snaps)
