"""Experts split into slices over the agents (expert tensor parallelism) give transformers' logits
and greedy text for every split mode: real agents over real gRPC, real generated checkpoints,
expert memory too small to hold the model, so that decode keeps needing experts no agent holds, and
disks slow enough (an expert read takes READ_S) that `auto` finds splitting one worth a round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from protos.convert import expert_batch_to_proto, expert_result_from_proto
from protos.ids import ExpertId, RequestId, SliceId
from protos.messages import DecodeSpan, ExpertBatch
from protos.potluck.v1 import agent_pb2_grpc as pb_grpc
from protos.routing import EXPERT_SPLITS, ExpertSplit
from scheduler.errors import AgentFailed
from scheduler.policy import Policy
from scheduler.types import GenerationRequest, SamplingParams
from tests.conftest import ARCHS
from tests.integration.cluster import expert_bytes, local_cluster
from tests.integration.test_equivalence import ATOL, PROMPT_LEN, transformers_outputs

READ_S = 0.02  # one expert's read on each agent's throttled disk


def slow_disk(model_dir: Path) -> float:
    return expert_bytes(model_dir) / READ_S


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("split", EXPERT_SPLITS)
async def test_home_prefill_logits_match_transformers_for_every_split_mode(tiny_models: dict[str, Path], arch: str,
                                                                          split: ExpertSplit) -> None:
    model_dir = tiny_models[arch]
    ids, expected, _ = transformers_outputs(model_dir)
    agents = 3
    async with local_cluster(model_dir, agents, expert_memory=2 * expert_bytes(model_dir),
                             disk_rate=slow_disk(model_dir)) as cluster:
        async with cluster.engine(expert_split=split) as engine:
            await engine.refresh()  # fills the agents' memory and publishes the routing table (with the mode)
            home = cluster.clients[0]
            await home.adopt_kv("r", PROMPT_LEN + 1, PROMPT_LEN, [], prefill_here=True)
            for start in range(0, PROMPT_LEN, 8):
                end = min(PROMPT_LEN, start + 8)
                result = await home.decode_step([DecodeSpan(request_id=RequestId("r"), token_ids=tuple(ids[start:end]),
                                                            position=start)], logits=True)
                assert result.logits is not None
                assert (result.logits[0] - expected[end - 1]).abs().max().item() <= ATOL, (start, end)
            await home.release("r")
            snaps = [await c.snapshot() for c in cluster.clients]
    split_runs = sum(s.decode_split_experts for s in snaps)
    if split == "never":
        assert split_runs == 0 and sum(s.slice_runs for s in snaps) == 0
    else:  # every split expert ran as one slice on each agent
        assert split_runs > 0 and sum(s.slice_runs for s in snaps) == split_runs * agents
        assert all(s.slice_runs > 0 for s in snaps)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("split", EXPERT_SPLITS)
async def test_sequence_parallel_prefill_logits_match_transformers_for_every_split_mode(
        tiny_models: dict[str, Path], arch: str, split: ExpertSplit) -> None:
    """Prefill's token scheduling splits experts no agent holds as its load balance says: each
    owner sends its pairs of a split expert to every agent of the split and adds up the slices'
    partial outputs. `always` splits each one, `never` none."""
    model_dir = tiny_models[arch]
    ids, expected, greedy = transformers_outputs(model_dir)
    agents = 3
    async with local_cluster(model_dir, agents, expert_memory=2 * expert_bytes(model_dir),
                             disk_rate=slow_disk(model_dir)) as cluster:
        logits = await cluster.runner(Policy(split=split)).prefill_logits("prefill-1", ids)
        assert (logits - expected).abs().max().item() <= ATOL
        request = GenerationRequest(RequestId("gen-1"), tuple(ids), SamplingParams(max_tokens=8, temperature=0))
        tokens = [e.token_id for e in await cluster.generate(request, home_prefill_max=0, expert_split=split)]
        snaps = [await c.snapshot() for c in cluster.clients]
    assert tokens == greedy[:8]
    split_runs = sum(s.prefill_split_experts for s in snaps)
    if split == "never":
        assert split_runs == 0
    elif split == "always":  # every owner of a split expert sent a slice to each agent
        assert split_runs > 0 and sum(s.slice_runs for s in snaps) >= split_runs
    assert all(s.requests == 0 for s in snaps)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("split", EXPERT_SPLITS)
@pytest.mark.parametrize("agents", [2, 3])
async def test_greedy_text_matches_transformers_for_every_split_mode(tiny_models: dict[str, Path], arch: str,
                                                                    split: ExpertSplit, agents: int) -> None:
    model_dir = tiny_models[arch]
    ids, _, greedy = transformers_outputs(model_dir)
    async with local_cluster(model_dir, agents, expert_memory=2 * expert_bytes(model_dir),
                             disk_rate=slow_disk(model_dir)) as cluster:
        request = GenerationRequest(RequestId("gen-1"), tuple(ids), SamplingParams(max_tokens=16, temperature=0))
        tokens = [e.token_id for e in await cluster.generate(request, home_prefill_max=PROMPT_LEN, prefill_chunk=8,
                                                             expert_split=split)]
        snaps = [await c.snapshot() for c in cluster.clients]
    assert tokens == greedy
    assert (sum(s.decode_split_experts for s in snaps) > 0) == (split != "never")
    # Splits read their next layer's guessed slices ahead; the text is the same either way.
    ahead, used = sum(s.read_ahead for s in snaps), sum(s.read_ahead_used for s in snaps)
    assert (ahead > 0) == (split != "never") and 0 <= used <= ahead
    assert all(s.requests == 0 for s in snaps)


@pytest.mark.parametrize("prefetch", [True, False])
async def test_decode_prefetch_reads_what_the_prompt_chose_and_keeps_the_text(qwen_tiny: Path, prefetch: bool) -> None:
    ids, _, greedy = transformers_outputs(qwen_tiny)
    async with local_cluster(qwen_tiny, 2, expert_memory=2 * expert_bytes(qwen_tiny)) as cluster:
        request = GenerationRequest(RequestId("gen-1"), tuple(ids), SamplingParams(max_tokens=16, temperature=0))
        tokens = [e.token_id for e in await cluster.generate(request, home_prefill_max=PROMPT_LEN, prefill_chunk=8,
                                                             decode_prefetch=prefetch)]
        snaps = [await c.snapshot() for c in cluster.clients]
    assert tokens == greedy
    reads = sum(s.decode_prefetch_reads for s in snaps)
    judged = sum(s.decode_prefetch_hits + s.decode_prefetch_misses for s in snaps)
    # The plan was made and the decode tokens judged against it (the home held at most 2 of the 24
    # experts); what it reads depends on the free memory then (test_home_prefetch.py checks that).
    assert (judged > 0) == prefetch and reads <= (1 if prefetch else 0)


@pytest.mark.parametrize("prefetch", [True, False])
async def test_the_pool_s_memory_takes_what_the_running_prompt_chose_and_keeps_the_text(qwen_tiny: Path,
                                                                                        prefetch: bool) -> None:
    """The pool-wide decode prefetch: with the pool's memory full of a first request's experts,
    a second prompt's most chosen ones are read in place of those it chose least, before its
    decode (a sequence-parallel prefill's refresh runs before its first decode step), and its
    decode selections are judged against that plan. The text is the same either way."""
    ids, _, greedy = transformers_outputs(qwen_tiny)
    size = expert_bytes(qwen_tiny)
    async with local_cluster(qwen_tiny, 2, expert_memory=3 * size, disk_rate=200 * size) as cluster:
        # No fills: what the agents hold when the plan is made follows from the requests' own
        # reads alone, not from how far the background fills got.
        async with cluster.engine(Policy.from_flags("sirius", no_fill=True), home_prefill_max=0,
                                  decode_prefetch=prefetch, poll_interval_s=60) as engine:
            other = torch.randint(0, 1000, (PROMPT_LEN,), generator=torch.Generator().manual_seed(5)).tolist()
            for i, prompt in enumerate([other, ids]):
                request = GenerationRequest(RequestId(f"gen-{i}"), tuple(prompt), SamplingParams(max_tokens=16,
                                                                                                 temperature=0))
                tokens = [e.token_id async for e in await engine.submit(request)]
                if i == 0:
                    before = engine.pool.prefetched_experts  # its own plan's (the first prompt's)
            snap = engine.snapshot()
    assert tokens == greedy
    assert (snap.prefetch_experts > before) == prefetch
    assert (snap.prefetch_hits + snap.prefetch_misses > 0) == prefetch


async def test_a_sequence_parallel_prompt_s_counts_reach_its_home_s_prefetch(qwen_tiny: Path) -> None:
    ids, _, greedy = transformers_outputs(qwen_tiny)
    async with local_cluster(qwen_tiny, 2, expert_memory=2 * expert_bytes(qwen_tiny)) as cluster:
        request = GenerationRequest(RequestId("gen-1"), tuple(ids), SamplingParams(max_tokens=16, temperature=0))
        tokens = [e.token_id for e in await cluster.generate(request, home_prefill_max=0)]  # prefilled on both
        snaps = [await c.snapshot() for c in cluster.clients]
        with pytest.raises(AgentFailed, match="prompt_counts"):  # not MoE layers x experts
            await cluster.clients[0].adopt_kv("bad", 8, 4, [], prefill_here=True, prompt_counts=[1, 2, 3])
    assert tokens == greedy
    assert sum(s.home_prefill_tokens for s in snaps) == 0
    assert sum(s.decode_prefetch_hits + s.decode_prefetch_misses for s in snaps) > 0  # the counts made a plan


async def test_auto_reads_a_cheap_expert_whole_rather_than_pay_a_round_trip(qwen_tiny: Path) -> None:
    """An unthrottled disk (a page-cached file here) reads an expert faster than a round trip to
    the other agents: `auto` splits nothing, `always` still does."""
    ids, _, greedy = transformers_outputs(qwen_tiny)
    for split, expect_splits in (("auto", False), ("always", True)):
        async with local_cluster(qwen_tiny, 2, expert_memory=2 * expert_bytes(qwen_tiny)) as cluster:
            request = GenerationRequest(RequestId("gen-1"), tuple(ids), SamplingParams(max_tokens=16, temperature=0))
            tokens = [e.token_id for e in await cluster.generate(request, home_prefill_max=PROMPT_LEN,
                                                                 expert_split=split)]
            snaps = [await c.snapshot() for c in cluster.clients]
        assert tokens == greedy
        assert (sum(s.decode_split_experts for s in snaps) > 0) == expect_splits, split


@pytest.mark.parametrize("load_balance", [True, False])
async def test_the_load_balance_leaves_a_slow_disk_out_of_splits(qwen_tiny: Path, load_balance: bool) -> None:
    """agent2 reads 5x slower than the others: its third of an expert takes longer than half of
    one on a fast disk, so the balance runs unheld experts on the two fast agents only (in every
    home's table); without it (`--no-load-balance`), a split goes over every agent."""
    ids, _, greedy = transformers_outputs(qwen_tiny)
    async with local_cluster(qwen_tiny, 3, expert_memory=2 * expert_bytes(qwen_tiny), disk_rate=slow_disk(qwen_tiny),
                             per_agent={2: {"disk_bytes_per_s": slow_disk(qwen_tiny) / 5}}) as cluster:
        request = GenerationRequest(RequestId("gen-1"), tuple(ids), SamplingParams(max_tokens=16, temperature=0))
        async with cluster.engine(load_balance=load_balance, home_prefill_max=PROMPT_LEN, prefill_chunk=8) as engine:
            await engine.refresh()  # fills the agents' memory and publishes each home's table
            tables = {c.name: engine.runs.get(c.name, {}) for c in cluster.clients}
            tokens = [e.token_id async for e in await engine.submit(request)]
        snaps = [await c.snapshot() for c in cluster.clients]
    assert tokens == greedy
    assert sum(s.decode_split_experts for s in snaps) > 0
    if load_balance:
        assert all(tables.values()) and all("agent2" not in n for t in tables.values() for n in t.values())
        assert snaps[2].slice_runs == 0 and snaps[0].slice_runs > 0 and snaps[1].slice_runs > 0
    else:
        assert tables == {"agent0": {}, "agent1": {}, "agent2": {}} and all(s.slice_runs > 0 for s in snaps)


async def test_no_decode_prefetch_reads_no_slice_ahead(qwen_tiny: Path) -> None:
    ids, _, greedy = transformers_outputs(qwen_tiny)
    async with local_cluster(qwen_tiny, 2, expert_memory=2 * expert_bytes(qwen_tiny),
                             disk_rate=slow_disk(qwen_tiny)) as cluster:
        request = GenerationRequest(RequestId("gen-1"), tuple(ids), SamplingParams(max_tokens=16, temperature=0))
        tokens = [e.token_id for e in await cluster.generate(request, home_prefill_max=PROMPT_LEN, prefill_chunk=8,
                                                             expert_split="always", decode_prefetch=False)]
        snaps = [await c.snapshot() for c in cluster.clients]
    assert tokens == greedy
    assert sum(s.decode_split_experts for s in snaps) > 0 and sum(s.read_ahead for s in snaps) == 0


async def test_an_agent_reads_ahead_the_slices_a_whole_or_an_empty_batch_names(qwen_tiny: Path) -> None:
    """A home tells every agent its guessed slices: with a whole expert's batch where the layer
    runs none split there, or alone in a batch of no rows. The agent answers at once and begins
    the reads; the slice asked for next is the one read ahead, not a second read."""
    cfg = json.loads((qwen_tiny / "config.json").read_text())
    hidden, layer = cfg["hidden_size"], 1
    x, w = torch.randn(1, hidden), torch.full((1, 2), 0.5)
    guessed = (SliceId(ExpertId(layer + 1, 3), 1, 2), SliceId(ExpertId(layer + 1, 4), 0, 2))
    async with local_cluster(qwen_tiny, 1, expert_memory=2 * expert_bytes(qwen_tiny),
                             disk_rate=slow_disk(qwen_tiny)) as cluster:
        async with cluster.enrolment.channel(cluster.specs[0]) as channel:
            stub = pb_grpc.NodeAgentStub(channel)

            async def run(x: torch.Tensor, ids: torch.Tensor, part: int = 0, of: int = 1,
                          ahead: tuple[SliceId, ...] = ()) -> torch.Tensor:
                batch = ExpertBatch(request_id="decode", layer=layer, hidden=x, expert_ids=ids, weights=w[:len(x)],
                                    decode=True, part=part, of=of, read_ahead=ahead)
                return expert_result_from_proto(await stub.RunExperts(expert_batch_to_proto(batch)))

            empty = await run(x[:0], torch.zeros(0, 2, dtype=torch.int32), ahead=guessed[:1])
            assert empty.shape == (0, hidden)
            whole = await run(x, torch.tensor([[0, 1]], dtype=torch.int32), ahead=guessed[1:])
            assert whole.shape == (1, hidden)
            ids = torch.tensor([[3, 4]], dtype=torch.int32)
            for piece in guessed:  # each asked for as the home's next layer would
                batch = ExpertBatch(request_id="decode", layer=layer + 1, hidden=x, expert_ids=ids, weights=w,
                                    decode=True, part=piece.part, of=piece.of)
                await stub.RunExperts(expert_batch_to_proto(batch))
        snap = await cluster.clients[0].snapshot()
    assert (snap.read_ahead, snap.read_ahead_used) == (2, 2)
