"""Speculative prefetch on real agents: it reads ahead, it is scored, and it changes no result."""

from __future__ import annotations

from pathlib import Path

import torch

from scheduler.policy import Policy
from tests.integration.cluster import local_cluster


async def run(model_dir: Path, policy: Policy) -> tuple[torch.Tensor, int, int, int]:
    async with local_cluster(model_dir, 2) as probe:
        expert_bytes = (await probe.clients[0].info()).expert_bytes
    async with local_cluster(model_dir, 2, expert_memory=6 * expert_bytes) as cluster:
        ids = torch.randint(0, 1000, (96,), generator=torch.Generator().manual_seed(5)).tolist()
        logits = await cluster.runner(policy).prefill_logits("p", ids)
        snaps = [await c.snapshot() for c in cluster.clients]
        return logits, sum(s.prefetches for s in snaps), sum(s.predicted_used for s in snaps), sum(s.used for s in snaps)


async def test_prefetch_reads_ahead_and_reports_recall(qwen_tiny: Path) -> None:
    with_logits, prefetches, hit, used = await run(qwen_tiny, Policy.from_flags("sirius"))
    assert prefetches > 0
    assert used > 0 and 0 < hit <= used  # recall = hit / used is defined and non-trivial
    without_logits, no_prefetches, _, no_used = await run(qwen_tiny, Policy.from_flags("sirius", no_prefetch=True))
    assert no_prefetches == 0 and no_used == 0
    assert torch.allclose(with_logits, without_logits, atol=1e-5)
