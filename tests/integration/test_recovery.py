"""An agent that fails mid-request: the request is replayed on the agents left (its prompt and
the tokens it produced, under a new id) and goes on with exactly the tokens an undisturbed run
gives, greedy or seeded; the failed agent is out of the cluster until it answers again. A holder
that fails while a home decodes costs no replay: the home runs that holder's experts itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from node_agent.model.config import MoeConfig
from scheduler.types import GenerationRequest, RequestId, SamplingParams, TokenEvent
from tests.integration.cluster import expert_bytes, local_cluster
from tests.integration.test_equivalence import prompt

PARAMS = {"greedy": SamplingParams(max_tokens=16, temperature=0),
          "seeded": SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)}


@pytest.mark.parametrize("who", ["home", "other"])
@pytest.mark.parametrize("prefill", ["sequence-parallel", "home"])
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
async def test_a_request_survives_an_agent_dying_mid_decode(qwen_tiny: Path, who: str, prefill: str,
                                                            sampling: str) -> None:
    """Three agents; after the 4th token, the request's home (or another agent) stops."""
    ids = prompt(1000, 40, seed=21)
    params = PARAMS[sampling]
    settings = {"home_prefill_max": 0 if prefill == "sequence-parallel" else 1024}
    async with local_cluster(qwen_tiny, 3) as cluster:
        want = await cluster.generate(GenerationRequest(RequestId("calm"), tuple(ids), params), **settings)
        async with cluster.engine(**settings) as engine:
            stream = await engine.submit(GenerationRequest(RequestId("storm"), tuple(ids), params))
            got: list[TokenEvent] = []
            async for event in stream:
                got.append(event)
                if len(got) == 4:
                    home = engine.batcher.running[0].home
                    assert home is not None
                    victim = home.name if who == "home" else next(s.name for s in cluster.specs if s.name != home.name)
                    await cluster.stop_agent(victim)
            status = {s.name: s.up for s in engine.snapshot().agents}
    assert [e.token_id for e in got] == [e.token_id for e in want]
    assert len(got) == params.max_tokens
    if who == "home":  # its steps failed: the engine took it out at once
        assert status[victim] is False


async def test_with_no_agent_left_the_stream_ends_with_the_error(qwen_tiny: Path) -> None:
    async with local_cluster(qwen_tiny, 1) as cluster, cluster.engine() as engine:
        stream = await engine.submit(GenerationRequest(RequestId("r"), tuple(prompt(1000, 20, seed=3)),
                                                       SamplingParams(max_tokens=20, temperature=0)))
        first = await stream.__anext__()
        await cluster.stop_agent("agent0")
        with pytest.raises(Exception, match="agent0"):
            async for _ in stream:
                pass
        assert first is not None
        await asyncio.sleep(0)


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
async def test_a_holder_dying_mid_decode_costs_no_replay(qwen_tiny: Path, sampling: str) -> None:
    """Three agents holding a third of the experts each; after the 4th token, the agent holding
    most of what the home lacks stops. The home's calls to it fail and it runs those experts
    itself: the request keeps its run (no replay) and every token is the undisturbed run's."""
    ids = prompt(1000, 40, seed=22)
    params = PARAMS[sampling]
    cfg = MoeConfig.load(qwen_tiny)
    experts = cfg.num_experts * sum(1 for layer in range(cfg.num_layers) if cfg.is_moe(layer))
    async with local_cluster(qwen_tiny, 3, expert_memory=(experts // 3 + 1) * expert_bytes(qwen_tiny)) as cluster:
        await cluster.generate(GenerationRequest(RequestId("warm"), tuple(prompt(1000, 40, seed=23)), params))
        want = await cluster.generate(GenerationRequest(RequestId("calm"), tuple(ids), params))
        async with cluster.engine() as engine:
            stream = await engine.submit(GenerationRequest(RequestId("storm"), tuple(ids), params))
            got: list[TokenEvent] = []
            async for event in stream:
                got.append(event)
                if len(got) == 4:
                    seq = engine.batcher.running[0]
                    assert seq.home is not None and seq.members == [seq.home.name]
                    home = seq.home.name
                    held = {s.name: s.held for s in engine.snapshot().agents}
                    victim = max((n for n in held if n != home), key=lambda n: len(held[n] - held[home]))
                    assert held[victim] - held[home]  # the home needs it
                    await cluster.stop_agent(victim)
            await engine.poll(up_only=True)
            fallbacks = {s.name: s.decode_fallback_experts for s in engine.snapshot().agents}
    assert [e.token_id for e in got] == [e.token_id for e in want]
    assert seq.epoch == 0, "the request was replayed"
    assert fallbacks[home] > 0
