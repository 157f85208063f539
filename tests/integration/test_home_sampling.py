"""The home samples a request's tokens with the generator the scheduler hands it, and the
scheduler pipelines decode steps (a step goes out before the reply of the one it follows): the
tokens are those drawn from transformers' logits with token i's randomness from (seed, i), a stop token ends a stream
while the next step is in flight, and nothing stays behind on any agent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from protos.messages import DecodeSpan
from protos.sampling import sample, token_generator
from scheduler.errors import AgentFailed
from scheduler.types import GenerationRequest, RequestId, SamplingParams, TokenEvent
from tests.integration.cluster import local_cluster
from tests.integration.test_decode import greedy_reference
from tests.integration.test_equivalence import prompt, reference


def sampled_reference(model_dir: Path, ids: list[int], params: SamplingParams) -> list[TokenEvent]:
    """transformers' logits, token i drawn by `sample` from (seed, i)."""
    model, out = reference(model_dir), []
    assert params.seed is not None
    with torch.no_grad():
        for i in range(params.max_tokens):
            event = sample(model(torch.tensor([ids])).logits[0, -1], params, token_generator(params.seed, i))
            out.append(event)
            ids = ids + [event.token_id]
    return out


@pytest.mark.parametrize("agents", [1, 2])
@pytest.mark.parametrize("home_max", [0, 64], ids=["sequence-parallel", "home"])
async def test_seeded_tokens_are_one_generator_drawing_from_transformers(qwen_tiny: Path, agents: int,
                                                                         home_max: int) -> None:
    """Sequence-parallel: the scheduler draws the first token and the home the rest; home
    prefill: the home draws them all. Either way the draws of transformers' logits."""
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, logprobs=True, top_logprobs=2)
    ids = prompt(1000, 29, seed=5)
    async with local_cluster(qwen_tiny, agents) as cluster:
        got = await cluster.generate(GenerationRequest(RequestId("s"), tuple(ids), params), home_prefill_max=home_max)
        snaps = [await c.snapshot() for c in cluster.clients]
    want = sampled_reference(qwen_tiny, ids, params)
    assert [e.token_id for e in got] == [e.token_id for e in want]
    for a, b in zip(got, want):
        assert a.logprob is not None and b.logprob is not None and abs(a.logprob - b.logprob) < 1e-4
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
    assert all(s.requests == 0 for s in snaps)


async def test_a_stop_token_ends_its_stream_while_the_next_step_is_in_flight(qwen_tiny: Path) -> None:
    """The stop token comes back while the step after it (which follows it) already runs: the
    stream ends at the stop, the request batched with it is unchanged, and both are released."""
    ids_a, ids_b = prompt(1000, 17, seed=11), prompt(1000, 23, seed=12)
    greedy_a = greedy_reference(qwen_tiny, ids_a, 10)
    stop = greedy_a[4]
    ends_at = greedy_a.index(stop)  # its first occurrence
    a = GenerationRequest(RequestId("a"), tuple(ids_a),
                          SamplingParams(max_tokens=10, temperature=0, stop_token_ids=frozenset({stop})))
    b = GenerationRequest(RequestId("b"), tuple(ids_b), SamplingParams(max_tokens=10, temperature=0))
    async with local_cluster(qwen_tiny, 2) as cluster:
        async with cluster.engine(max_running=4) as engine:
            streams = [await engine.submit(r) for r in (a, b)]

            async def drain(stream: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
                return [e async for e in stream]

            got_a, got_b = await asyncio.gather(*(drain(s) for s in streams))
        snaps = [await c.snapshot() for c in cluster.clients]
    assert [e.token_id for e in got_a] == greedy_a[:ends_at + 1] and got_a[-1].is_stop
    assert [e.token_id for e in got_b] == greedy_reference(qwen_tiny, ids_b, 10)
    # Every token after each first was a decode step's, and one step ran past a's stop.
    assert sum(s.decode_tokens for s in snaps) == ends_at + 9 + 1
    assert all(s.requests == 0 for s in snaps)


async def test_a_step_sent_before_the_one_it_follows_is_over_runs_after_it(qwen_tiny: Path) -> None:
    """Two steps on the wire at once: the prompt, then a span that follows the token the home
    samples after it. The second waits for the first and feeds that token."""
    ids = prompt(1000, 19, seed=13)
    params = SamplingParams(max_tokens=3, temperature=0)
    async with local_cluster(qwen_tiny, 1) as cluster:
        home = cluster.clients[0]
        await home.adopt_kv("r", len(ids) + 2, len(ids), [], prefill_here=True, sampling=params)
        first, second = await asyncio.gather(
            home.decode_step([DecodeSpan(request_id=RequestId("r"), token_ids=tuple(ids), position=0)]),
            home.decode_step([DecodeSpan(request_id=RequestId("r"), token_ids=(), position=len(ids))], logits=True))
        await home.release("r")
        await home.adopt_kv("q", 10, 8, [], prefill_here=True, sampling=params)
        await home.decode_step([DecodeSpan(request_id=RequestId("q"), token_ids=tuple(ids[:4]), position=0)])
        with pytest.raises(AgentFailed, match="INVALID_ARGUMENT.*that step sampled none"):  # it ended inside the prompt
            await home.decode_step([DecodeSpan(request_id=RequestId("q"), token_ids=(), position=4)])
        await home.release("q")
    greedy = greedy_reference(qwen_tiny, ids, 2)
    assert first.tokens[0] is not None and second.tokens[0] is not None
    assert [first.tokens[0].token_id, second.tokens[0].token_id] == greedy
    with torch.no_grad():
        expected = reference(qwen_tiny)(torch.tensor([ids + greedy[:1]])).logits[0, -1]
    assert second.logits is not None and (second.logits[0] - expected).abs().max().item() <= 1e-4


async def test_a_step_that_arrives_before_the_one_it_follows_waits_for_it(qwen_tiny: Path) -> None:
    """Pipelined steps may reach the home in either order: the later one (sent first here, with
    a head start) waits until the K/V reaches its position, and both sample what one step after
    the other would."""
    ids = prompt(1000, 17, seed=14)
    params = SamplingParams(max_tokens=3, temperature=0)
    async with local_cluster(qwen_tiny, 1) as cluster:
        home = cluster.clients[0]
        await home.adopt_kv("r", len(ids) + 2, len(ids), [], prefill_here=True, sampling=params)
        later = asyncio.ensure_future(home.decode_step([DecodeSpan(request_id=RequestId("r"), token_ids=(),
                                                                   position=len(ids))]))  # fmt: skip
        await asyncio.sleep(0.2)  # an order to create, not a wait for an outcome: either order must pass
        first = await home.decode_step([DecodeSpan(request_id=RequestId("r"), token_ids=tuple(ids), position=0)])
        second = await later
        await home.release("r")
    assert first.tokens[0] is not None and second.tokens[0] is not None
    assert [first.tokens[0].token_id, second.tokens[0].token_id] == greedy_reference(qwen_tiny, ids, 2)


@pytest.mark.parametrize("home_max", [0, 64], ids=["sequence-parallel", "home"])
async def test_a_consumer_leaving_mid_stream_releases_its_request_everywhere(qwen_tiny: Path, home_max: int) -> None:
    """The consumer leaves after three tokens, while the step after them is already in flight:
    closing its stream returns once every agent has released the request, and the next request
    runs as usual."""
    ids_a, ids_b = prompt(1000, 21, seed=14), prompt(1000, 15, seed=15)
    a = GenerationRequest(RequestId("a"), tuple(ids_a), SamplingParams(max_tokens=40, temperature=0))
    b = GenerationRequest(RequestId("b"), tuple(ids_b), SamplingParams(max_tokens=6, temperature=0))
    async with local_cluster(qwen_tiny, 2) as cluster:
        async with cluster.engine(max_running=4, home_prefill_max=home_max) as engine:
            stream = await engine.submit(a)
            head = [await stream.__anext__() for _ in range(3)]
            await stream.aclose()  # type: ignore[attr-defined]
            left = [await c.snapshot() for c in cluster.clients]
            got_b = [e.token_id async for e in await engine.submit(b)]
    assert [e.token_id for e in head] == greedy_reference(qwen_tiny, ids_a, 3)
    assert all(s.requests == 0 for s in left)
    assert got_b == greedy_reference(qwen_tiny, ids_b, 6)


async def test_a_home_refuses_sampling_it_cannot_follow(qwen_tiny: Path) -> None:
    async with local_cluster(qwen_tiny, 1) as cluster:
        home = cluster.clients[0]
        with pytest.raises(AgentFailed, match="INVALID_ARGUMENT.*sampling parameters out of range"):
            await home.adopt_kv("r", 12, 8, [], prefill_here=True, sampling=SamplingParams(max_tokens=4, top_p=0))
        with pytest.raises(AgentFailed, match="INVALID_ARGUMENT.*sampled must be >= 0"):
            await home.adopt_kv("r", 12, 8, [], prefill_here=True, sampling=SamplingParams(max_tokens=4), sampled=-1)
        assert (await home.snapshot()).requests == 0
