"""A prompt prefilled on its home, in decode steps' spans, gives transformers' logits and greedy
tokens for every agent count, expert budget and chunk size; a malformed span is refused (real
agents over real gRPC, real generated checkpoints)."""

from __future__ import annotations

from pathlib import Path

import pytest

from protos.ids import RequestId
from protos.messages import DecodeSpan
from scheduler.errors import AgentFailed
from scheduler.types import GenerationRequest, SamplingParams
from tests.conftest import ARCHS
from tests.integration.cluster import expert_bytes, local_cluster
from tests.integration.test_equivalence import ATOL, PROMPT_LEN, transformers_outputs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("agents", [1, 3])
@pytest.mark.parametrize("budget_experts", [0, 2])  # 0 = unlimited; 2: most experts run on holders or are read
@pytest.mark.parametrize("chunk", [PROMPT_LEN, 8, 1])
async def test_spans_give_transformers_logits_at_each_chunk_end(
    tiny_models: dict[str, Path], arch: str, agents: int, budget_experts: int, chunk: int
) -> None:
    model_dir = tiny_models[arch]
    ids, expected, _ = transformers_outputs(model_dir)
    async with local_cluster(model_dir, agents, expert_memory=budget_experts * expert_bytes(model_dir)) as cluster:
        async with cluster.engine() as engine:
            await engine.refresh()  # fills the agents' memory and publishes the routing table
            home = cluster.clients[0]
            await home.adopt_kv("r", PROMPT_LEN + 1, PROMPT_LEN, [], prefill_here=True)
            for start in range(0, PROMPT_LEN, chunk):
                end = min(PROMPT_LEN, start + chunk)
                result = await home.decode_step([DecodeSpan(request_id=RequestId("r"), token_ids=tuple(ids[start:end]),
                                                            position=start)], logits=True)
                assert result.logits is not None
                assert (result.logits[0] - expected[end - 1]).abs().max().item() <= ATOL, (start, end)
                assert (result.tokens[0] is None) == (end < PROMPT_LEN)  # the home samples after the prompt
            await home.release("r")
            snap = await home.snapshot()
        if agents > 1:  # the fill spread the experts: the home sent the chunks' tokens to their holders
            assert snap.decode_remote_experts > 0
        assert snap.decode_tokens == 0  # a prompt's spans are not decode tokens


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("agents", [1, 2, 3])
@pytest.mark.parametrize("budget_experts", [0, 2])
async def test_greedy_tokens_match_transformers(tiny_models: dict[str, Path], arch: str, agents: int,
                                                budget_experts: int) -> None:
    model_dir = tiny_models[arch]
    ids, _, greedy = transformers_outputs(model_dir)
    async with local_cluster(model_dir, agents, expert_memory=budget_experts * expert_bytes(model_dir)) as cluster:
        request = GenerationRequest(RequestId("gen-1"), tuple(ids), SamplingParams(max_tokens=16, temperature=0))
        tokens = [e.token_id for e in await cluster.generate(request, home_prefill_max=PROMPT_LEN, prefill_chunk=8)]
        snaps = [await c.snapshot() for c in cluster.clients]
    assert tokens == greedy
    assert sum(s.decode_tokens for s in snaps) == 15  # the prompt's steps are not decode steps
    assert sum(s.home_prefill_tokens for s in snaps) == PROMPT_LEN
    assert all(s.requests == 0 for s in snaps)


async def test_a_span_that_skips_or_repeats_positions_is_refused(qwen_tiny: Path) -> None:
    async with local_cluster(qwen_tiny, 1) as cluster:
        home = cluster.clients[0]
        await home.adopt_kv("r", 12, 8, [], prefill_here=True)
        bad = [DecodeSpan(request_id=RequestId("r"), token_ids=(1, 2), position=3),  # skips 0..2
               DecodeSpan(request_id=RequestId("r"), token_ids=tuple(range(13)), position=0),  # past the cache
               DecodeSpan(request_id=RequestId("r"), token_ids=(), position=0)]  # follows no sampled token
        for span in bad:
            with pytest.raises(AgentFailed, match="INVALID_ARGUMENT|span"):
                await home.decode_step([span])
        await home.decode_step([DecodeSpan(request_id=RequestId("r"), token_ids=(1, 2, 3), position=0)])
        with pytest.raises(AgentFailed, match="starts at position 0; its K/V ends at 3"):
            await home.decode_step([DecodeSpan(request_id=RequestId("r"), token_ids=(4,), position=0)])
        with pytest.raises(AgentFailed, match="prefill K/V"):  # prefill_here with sources
            await home.adopt_kv("s", 12, 8, [(home.name, home.spec.address)], prefill_here=True)
        await home.release("r")
