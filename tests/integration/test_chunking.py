"""Tensors larger than one message travel in row chunks and arrive intact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import node_agent.peers
from node_agent.peers import row_chunks
from scheduler.policy import Policy
from tests.integration.cluster import local_cluster


def test_row_chunks_cover_every_row_once_within_the_limit() -> None:
    for rows, row_bytes in [(0, 100), (1, 10**9), (1000, 4096), (37, 1)]:
        chunks = row_chunks(rows, row_bytes)
        covered = [i for c in chunks for i in range(rows)[c]]
        assert covered == list(range(rows))
        assert all(len(range(rows)[c]) * row_bytes <= max(node_agent.peers.CHUNK_BYTES, row_bytes) for c in chunks)


async def test_kv_blocks_and_expert_batches_split_into_chunks_give_the_same_logits(
    qwen_tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = torch.randint(0, 1000, (80,), generator=torch.Generator().manual_seed(9)).tolist()
    async with local_cluster(qwen_tiny, 3) as cluster:
        whole = await cluster.runner(Policy.from_flags("naive")).prefill_logits("whole", ids)
    monkeypatch.setattr(node_agent.peers, "CHUNK_BYTES", 2048)  # a few token rows per message
    async with local_cluster(qwen_tiny, 3) as cluster:
        chunked = await cluster.runner(Policy.from_flags("naive")).prefill_logits("chunked", ids)
    assert torch.allclose(whole, chunked, atol=1e-5)
