"""A request whose prompt K/V is still moving to its home over a slow link decodes by attending
over it where it is (split-KV) instead of waiting, and gives transformers' greedy tokens; its
sources release the prompt's K/V once it has all arrived (real agents, real gRPC, real
generated checkpoints)."""

from __future__ import annotations

from pathlib import Path

from scheduler.types import GenerationRequest, RequestId, SamplingParams
from tests.integration.cluster import local_cluster
from tests.integration.test_decode import greedy_reference
from tests.integration.test_equivalence import prompt

PROMPT = 400  # tokens: ~200 on each of 2 agents, ~51 KB of K/V per layer to move
LINK = 1_000_000  # bytes/s: a layer's K/V takes ~50 ms to move, a round trip ~3 ms


async def test_decode_attends_over_kv_still_moving_and_matches_transformers(qwen_tiny: Path) -> None:
    ids = prompt(1000, PROMPT, seed=8)  # ids below the tiny vocabulary, as test_decode's requests
    greedy = greedy_reference(qwen_tiny, ids, 8)
    async with local_cluster(qwen_tiny, 2, link_rate=LINK, link_latency_s=0.001) as cluster:
        request = GenerationRequest(RequestId("r"), tuple(ids), SamplingParams(max_tokens=8, temperature=0))
        # Sequence-parallel prefill, so that half of the prompt's K/V must move to the home.
        tokens = [e.token_id for e in await cluster.generate(request, home_prefill_max=0)]
        snaps = [await c.snapshot() for c in cluster.clients]
    assert tokens == greedy
    assert sum(s.decode_split_attention for s in snaps) > 0  # it did not wait for every layer
    assert all(s.requests == 0 for s in snaps)  # the source released its K/V, the home its cache
