"""Requests carry the OpenAI `user`: a user listed by a node of the inventory decodes there, any
other user on its rendezvous-hashed agent, with the same tokens as anywhere else; the homes'
decode steps report the experts their tokens chose, which the activation window counts per
home (real agents over real gRPC, a real generated checkpoint)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from protos.ids import NodeId, RequestId
from scheduler.batching import Batcher
from scheduler.decode_plan import user_home
from scheduler.runner import ClusterView
from scheduler.service import EngineService
from scheduler.types import GenerationRequest, SamplingParams
from tests.integration.cluster import local_cluster
from tests.integration.test_decode import greedy_reference

PROMPT = tuple(range(3, 40))


def request(rid: str, user: str | None) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=frozenset())
    return GenerationRequest(RequestId(rid), PROMPT, sampling, user)


async def tokens_by_home(engine: EngineService, req: GenerationRequest) -> tuple[list[int], dict[str, int]]:
    """The request's tokens, and how many tokens each home reported meanwhile."""
    before = {h: v["tokens"] for h, v in engine.activation_stats()["homes"].items()}
    out = [e.token_id async for e in await engine.submit(req)]
    after = {h: v["tokens"] for h, v in engine.activation_stats()["homes"].items()}
    return out, {h: n - before.get(h, 0) for h, n in after.items() if n != before.get(h, 0)}


async def test_a_users_requests_decode_on_its_home_with_the_same_tokens(qwen_tiny: Path) -> None:
    async with local_cluster(qwen_tiny, 3) as cluster:
        cluster.specs = [dataclasses.replace(s, users=("alice",)) if s.name == "agent2" else s for s in cluster.specs]
        async with cluster.engine() as engine:
            anywhere, homes = await tokens_by_home(engine, request("r0", None))
            assert homes  # some home reported its steps
            alice, homes = await tokens_by_home(engine, request("r1", "alice"))
            assert alice == anywhere and set(homes) == {"agent2"}
            assert homes["agent2"] >= len(PROMPT) + 5  # the prompt, prefilled on the home, and 5 decoded tokens
            bob_home = user_home("bob", [s.name for s in cluster.specs], {})
            for i in range(2):  # sticky
                bob, homes = await tokens_by_home(engine, request(f"r{2 + i}", "bob"))
                assert bob == anywhere and set(homes) == {bob_home}
            stats = engine.activation_stats()["homes"][NodeId("agent2")]
            for layer in stats["layers"]:  # top-2 routing: two selections a token in every layer
                assert sum(layer["counts"]) == 2 * stats["tokens"]


async def test_each_home_decodes_at_its_own_pace(qwen_tiny: Path) -> None:
    """Two users on two homes, one of which answers 100 ms late (its link latency): the other
    user's request goes at its own home's pace, not the slow home's, and both get the tokens
    they would get alone."""
    async with local_cluster(qwen_tiny, 2, per_agent={1: {"link_latency_s": 0.1}}) as cluster:
        cluster.specs = [dataclasses.replace(s, users=("fast",) if s.name == "agent0" else ("slow",))
                         for s in cluster.specs]  # fmt: skip
        sampling = SamplingParams(max_tokens=32, temperature=0.0, stop_token_ids=frozenset())
        fast = GenerationRequest(RequestId("fast"), PROMPT, sampling, "fast")
        slow = GenerationRequest(RequestId("slow"), PROMPT[::-1], sampling, "slow")
        async with cluster.engine(max_running=4) as engine:
            slow_tokens: list[int] = []

            async def drain_slow() -> None:
                async for e in await engine.submit(slow):
                    slow_tokens.append(e.token_id)

            slow_task = asyncio.ensure_future(drain_slow())
            fast_tokens = [e.token_id async for e in await engine.submit(fast)]
            slow_when_fast_ended = len(slow_tokens)
            await slow_task
    assert fast_tokens == greedy_reference(qwen_tiny, list(PROMPT), 32)
    assert slow_tokens == greedy_reference(qwen_tiny, list(PROMPT[::-1]), 32)
    # Held to the slow home's steps, the slow request would be within a token or two of the
    # fast one; at its own pace (about 50 ms a token there) it is far behind.
    assert slow_when_fast_ended <= 16, slow_when_fast_ended


async def test_decode_goes_on_while_holdings_are_refreshed_after_a_prefill(qwen_tiny: Path) -> None:
    """The refresh after a prompt prefilled on its home (holdings, fills, routing tables) runs
    beside the loop: here it hangs until the request is done, and the request still gets every
    token (the loop once awaited it, and with it every home's next step)."""
    async with local_cluster(qwen_tiny, 2) as cluster:
        view = ClusterView.from_infos([await c.info() for c in cluster.clients])
        refreshes, release = 0, asyncio.Event()

        async def hanging_refresh() -> None:
            nonlocal refreshes
            refreshes += 1
            await release.wait()

        batcher = Batcher(lambda: (cluster.clients, view), on_prefilled=hanging_refresh)
        req = request("r", None)

        async def collect() -> list[int]:
            return [e.token_id async for e in batcher.generate(req)]

        tokens = await asyncio.wait_for(collect(), 120)  # stalled, it would never end
        assert refreshes == 1 and not release.is_set()
        release.set()
        await batcher.aclose()
    assert tokens == greedy_reference(qwen_tiny, list(PROMPT), req.sampling.max_tokens)
