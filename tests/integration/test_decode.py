"""Decode on home agents with continuous batching gives exactly the tokens of one request alone,
and of transformers (real agents over real gRPC, real generated checkpoints)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from node_agent import decode, decode_batch
from scheduler.types import GenerationRequest, RequestId, SamplingParams, TokenEvent
from tests.integration.cluster import Cluster, expert_bytes, local_cluster
from tests.integration.test_equivalence import prompt, reference

LENGTHS = (23, 37, 9, 51)  # prompts of unlike lengths, so the batch's positions differ
MAX_TOKENS = (12, 7, 16, 10)  # and unlike ends, so requests leave the batch at different steps


def greedy_reference(model_dir: Path, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = reference(model_dir).generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def requests(vocab: int, temperature: float = 0.0) -> list[GenerationRequest]:
    return [GenerationRequest(RequestId(f"r{i}"), tuple(prompt(vocab, n, seed=i)),
                              SamplingParams(max_tokens=m, temperature=temperature, seed=100 + i, logprobs=True))
            for i, (n, m) in enumerate(zip(LENGTHS, MAX_TOKENS))]


async def together(cluster: Cluster, reqs: list[GenerationRequest], **settings: object) -> list[list[TokenEvent]]:
    """Every request submitted at once to one engine."""
    async with cluster.engine(**settings) as engine:
        streams = [await engine.submit(r) for r in reqs]

        async def drain(stream: object) -> list[TokenEvent]:
            return [e async for e in stream]  # type: ignore[attr-defined]

        return list(await asyncio.gather(*(drain(s) for s in streams)))


@pytest.mark.parametrize("agents", [1, 3])
@pytest.mark.parametrize("home_max", [0, 64], ids=["sequence-parallel", "home"])  # where prompts are prefilled
async def test_batched_greedy_requests_match_transformers_and_their_runs_alone(qwen_tiny: Path, agents: int,
                                                                               home_max: int) -> None:
    reqs = requests(1000)
    async with local_cluster(qwen_tiny, agents) as cluster:
        alone = [await cluster.generate(r, max_running=1, home_prefill_max=home_max) for r in reqs]
        batched = await together(cluster, reqs, max_running=4, prefill_chunk=8, home_prefill_max=home_max)
        snaps = [await c.snapshot() for c in cluster.clients]
    for r, one, many in zip(reqs, alone, batched):
        assert [e.token_id for e in many] == [e.token_id for e in one]
        assert [e.token_id for e in one] == greedy_reference(qwen_tiny, list(r.prompt_token_ids), r.sampling.max_tokens)
        for a, b in zip(one, many):
            assert a.logprob is not None and b.logprob is not None and abs(a.logprob - b.logprob) < 1e-4
    steps, tokens = sum(s.decode_steps for s in snaps), sum(s.decode_tokens for s in snaps)
    assert tokens == 2 * sum(m - 1 for m in MAX_TOKENS)  # every token but each request's first, twice
    assert steps < tokens  # the batched run decoded several requests per step (on one home)
    assert all(s.requests == 0 for s in snaps)  # every agent released every request


async def test_seeded_sampling_is_the_same_batched_or_alone(qwen_tiny: Path) -> None:
    reqs = requests(1000, temperature=0.9)
    async with local_cluster(qwen_tiny, 2) as cluster:
        alone = [await cluster.generate(r, max_running=1) for r in reqs]
        batched = await together(cluster, reqs, max_running=4)
    assert [[e.token_id for e in s] for s in batched] == [[e.token_id for e in s] for s in alone]


@pytest.mark.parametrize("home_max", [0, 64], ids=["sequence-parallel", "home"])
async def test_a_prompt_arriving_while_others_decode_is_prefilled_in_chunks(qwen_tiny: Path, home_max: int) -> None:
    """The late request's prompt (51 tokens) goes in chunks of 8 while the first one decodes;
    both still give transformers' tokens."""
    first, late = requests(1000)[2], requests(1000)[3]
    async with (local_cluster(qwen_tiny, 2) as cluster,
                cluster.engine(max_running=4, prefill_chunk=8, home_prefill_max=home_max) as engine):
        stream = await engine.submit(GenerationRequest(first.request_id, first.prompt_token_ids,
                                                       SamplingParams(max_tokens=40, temperature=0)))
        head = [await stream.__anext__() for _ in range(2)]  # it decodes now
        late_tokens = [e.token_id async for e in await engine.submit(late)]
        rest = [e async for e in stream]
    assert late_tokens == greedy_reference(qwen_tiny, list(late.prompt_token_ids), late.sampling.max_tokens)
    assert [e.token_id for e in head + rest] == greedy_reference(qwen_tiny, list(first.prompt_token_ids), 40)


async def test_decode_with_every_expert_local_makes_no_round_trip(qwen_tiny: Path) -> None:
    """The request runs twice: the first reads its experts (and the agent may fill the rest
    meanwhile, so a decode token can wait on a read in progress); the second finds them held."""
    req = requests(1000)[0]
    async with local_cluster(qwen_tiny, 1) as cluster:
        await cluster.generate(req)
        first = await cluster.clients[0].snapshot()
        again = await cluster.generate(req)
        snap = await cluster.clients[0].snapshot()
    assert len(again) == req.sampling.max_tokens
    assert snap.decode_tokens - first.decode_tokens == req.sampling.max_tokens - 1
    assert snap.decode_round_trips == 0 and snap.decode_peer_wait_s == 0
    assert snap.decode_step_s > first.decode_step_s and snap.decode_read_wait_s == first.decode_read_wait_s


async def test_decode_reading_experts_no_agent_holds_counts_its_waits_on_the_disk(qwen_tiny: Path) -> None:
    """One agent with room for a third of the experts: the rest are read on demand, and the step
    time says how much of it waited on those reads; the tokens are unchanged."""
    req = requests(1000)[2]
    size = expert_bytes(qwen_tiny)
    async with local_cluster(qwen_tiny, 1, expert_memory=8 * size, disk_rate=200 * size) as cluster:
        tokens = [e.token_id for e in await cluster.generate(req)]
        snap = await cluster.clients[0].snapshot()
    assert tokens == greedy_reference(qwen_tiny, list(req.prompt_token_ids), req.sampling.max_tokens)
    assert snap.decode_peer_wait_s == 0 and 0 < snap.decode_read_wait_s < snap.decode_step_s


@pytest.mark.parametrize("pipeline_rows", [decode_batch.PIPELINE_ROWS, 16], ids=["whole", "halves"])
async def test_batched_steps_on_a_pooled_memory_home_match_the_requests_alone(qwen_tiny: Path, pipeline_rows: int,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Three agents with room for a third of the experts each, four requests on one home: its
    batched steps run on its event loop, a layer's sends leaving before its local experts (on
    the compute thread when there are more than one); the tokens are each request's alone. With
    `halves`, the step that prefills the four prompts (120 rows) goes on as two halves."""
    monkeypatch.setattr(decode_batch, "PIPELINE_ROWS", pipeline_rows)
    forks: list[int] = []
    parts_of = decode.parts_of

    def spy(run: Any, parts: Any) -> Any:
        forks.append(len(parts))
        return parts_of(run, parts)

    monkeypatch.setattr(decode, "parts_of", spy)
    reqs = requests(1000)
    total = 3 * 8  # tiny preset: 3 MoE layers of 8 experts
    async with local_cluster(qwen_tiny, 3, expert_memory=(total // 3) * expert_bytes(qwen_tiny)) as cluster:
        alone = [await cluster.generate(r, max_running=1) for r in reqs]
        batched = await together(cluster, reqs, max_running=4, home_prefill_max=64)
        snaps = [await c.snapshot() for c in cluster.clients]
    for r, one, many in zip(reqs, alone, batched):
        assert [e.token_id for e in many] == [e.token_id for e in one]
        for a, b in zip(one, many):
            assert a.logprob is not None and b.logprob is not None and abs(a.logprob - b.logprob) < 1e-4
    assert sum(s.decode_remote_experts for s in snaps) > 0 and sum(s.decode_local_experts for s in snaps) > 0
    assert sum(s.decode_steps for s in snaps) < sum(s.decode_tokens for s in snaps)  # several requests a step
    assert (forks and set(forks) == {2}) if pipeline_rows == 16 else not forks  # steps of prompts only


async def test_pooled_memory_decode_calls_holders_at_most_once_per_layer(qwen_tiny: Path) -> None:
    """Three agents with room for a third of the experts each: a home lacks most experts and
    sends their tokens to the holders the routing table names; the tokens are unchanged."""
    req = requests(1000)[1]
    total = 3 * 8  # tiny preset: 3 MoE layers of 8 experts
    async with local_cluster(qwen_tiny, 3, expert_memory=(total // 3) * expert_bytes(qwen_tiny)) as cluster:
        tokens = [e.token_id for e in await cluster.generate(req)]
        snaps = [await c.snapshot() for c in cluster.clients]
    assert tokens == greedy_reference(qwen_tiny, list(req.prompt_token_ids), req.sampling.max_tokens)
    steps = sum(s.decode_steps for s in snaps)
    assert steps == req.sampling.max_tokens - 1
    assert sum(s.decode_remote_experts for s in snaps) > 0  # some experts really ran on a holder
    assert sum(s.decode_round_trips for s in snaps) <= 3 * steps  # one per layer at most
    waits = sum(s.decode_peer_wait_s + s.decode_read_wait_s for s in snaps)
    assert sum(s.decode_peer_wait_s for s in snaps) > 0 and waits < sum(s.decode_step_s for s in snaps)
