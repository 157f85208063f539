"""A prompt prefilled on its home, in decode steps' spans, gives transformers' logits and greedy
tokens for every agent count, expert budget and chunk size; a malformed span is refused (real
agents over real gRPC, real generated checkpoints)."""

from __future__ import annotations

import asyncio
import contextvars
from pathlib import Path
from typing import Any

import pytest
import torch

from node_agent import decode, decode_batch
from node_agent.model.config import MoeConfig
from protos.ids import RequestId
from protos.messages import DecodeResult, DecodeSpan
from scheduler.errors import AgentFailed
from scheduler.types import GenerationRequest, SamplingParams
from tests.conftest import ARCHS
from tests.integration.cluster import expert_bytes, local_cluster
from tests.integration.test_equivalence import ATOL, PROMPT_LEN, transformers_outputs


def expected_moe_layers(model_dir: Path) -> list[int]:
    cfg = MoeConfig.load(model_dir)
    return [i for i in range(cfg.num_layers) if cfg.is_moe(i)]


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


@pytest.mark.parametrize("arch", ARCHS)
async def test_the_last_layer_runs_only_the_logits_rows_experts(tiny_models: dict[str, Path], arch: str) -> None:
    """Past the last layer only each span's last row is read (its logits): that layer's experts
    run for those rows alone, while every row's choice is still reported."""
    model_dir = tiny_models[arch]
    ids, expected, _ = transformers_outputs(model_dir)
    half = PROMPT_LEN // 2
    async with local_cluster(model_dir, 1) as cluster:  # every expert resident: each run is a local one
        async with cluster.engine() as engine:
            await engine.refresh()
            home = cluster.clients[0]
            experts = (await home.info()).num_experts * len(expected_moe_layers(model_dir))
            while len(await home.resident()) < experts:  # the fill reads every expert in the background
                await asyncio.sleep(0.05)
            for rid in ("a", "b"):
                await home.adopt_kv(rid, PROMPT_LEN + 1, PROMPT_LEN, [], prefill_here=True)
            before = await home.snapshot()
            result = await home.decode_step([DecodeSpan(request_id=RequestId("a"), token_ids=tuple(ids[:half]), position=0),
                                             DecodeSpan(request_id=RequestId("b"), token_ids=tuple(ids), position=0)],
                                            logits=True)
            after = await home.snapshot()
    assert result.logits is not None and result.selections is not None
    assert (result.logits[0] - expected[half - 1]).abs().max().item() <= ATOL
    assert (result.logits[1] - expected[PROMPT_LEN - 1]).abs().max().item() <= ATOL
    chosen = result.selections  # [MoE layers, rows, k]: the last layer's too, for every row
    assert chosen.shape[1] == half + PROMPT_LEN
    last_rows = [half - 1, half + PROMPT_LEN - 1]
    runs = (sum(len(set(layer.flatten().tolist())) for layer in chosen[:-1])
            + len(set(chosen[-1][last_rows].flatten().tolist())))
    assert len(set(chosen[-1].flatten().tolist())) > len(set(chosen[-1][last_rows].flatten().tolist()))
    assert after.decode_local_experts - before.decode_local_experts == runs


def record_forks(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The rows of each part every step from now on goes on as (`decode.parts_of`)."""
    forks: list[list[int]] = []
    parts_of = decode.parts_of

    def spy(run: Any, parts: Any) -> Any:
        forks.append([len(p.token_ids) for p in parts])
        return parts_of(run, parts)

    monkeypatch.setattr(decode, "parts_of", spy)
    return forks


async def whole_then_halves(model_dir: Path, monkeypatch: pytest.MonkeyPatch, ids: list[int],
                            prompts: dict[str, int]) -> list[DecodeResult]:
    """One step prefilling these prompts (name -> its first tokens of `ids`) on a home whose
    layers call peers, whole, then again with PIPELINE_ROWS lowered to 8 (as two halves)."""
    results = []
    async with local_cluster(model_dir, 3, expert_memory=2 * expert_bytes(model_dir)) as cluster:
        async with cluster.engine() as engine:
            await engine.refresh()  # most experts on holders: the layers call peers
            home = cluster.clients[0]
            greedy = SamplingParams(max_tokens=1, temperature=0)
            for rows in (decode_batch.PIPELINE_ROWS, 8):
                monkeypatch.setattr(decode_batch, "PIPELINE_ROWS", rows)
                for name, n in prompts.items():
                    await home.adopt_kv(f"{name}{rows}", n + 1, n, [], prefill_here=True, sampling=greedy)
                results.append(await home.decode_step(
                    [DecodeSpan(request_id=RequestId(f"{name}{rows}"), token_ids=tuple(ids[:n]), position=0)
                     for name, n in prompts.items()], logits=True))
                for name in prompts:
                    await home.release(f"{name}{rows}")
    return results


@pytest.mark.parametrize("arch", ARCHS)
async def test_prompts_prefilled_together_go_on_as_two_halves(tiny_models: dict[str, Path], arch: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two prompts in a step of PIPELINE_ROWS rows or more (lowered here) go on as two halves
    after the first layer that called peers: each prompt gets transformers' logits, and the step
    the tokens and selections it gets whole."""
    model_dir = tiny_models[arch]
    ids, expected, _ = transformers_outputs(model_dir)
    short = PROMPT_LEN - 3
    forks = record_forks(monkeypatch)
    results = await whole_then_halves(model_dir, monkeypatch, ids, {"a": PROMPT_LEN, "b": short})
    assert forks == [[PROMPT_LEN, short]]  # the second step only
    whole, halves = results
    for result in results:
        assert result.logits is not None
        assert (result.logits[0] - expected[PROMPT_LEN - 1]).abs().max().item() <= ATOL
        assert (result.logits[1] - expected[short - 1]).abs().max().item() <= ATOL
    assert [t.token_id for t in halves.tokens if t] == [t.token_id for t in whole.tokens if t]
    assert len(halves.tokens) == 2 and None not in halves.tokens
    assert halves.selections is not None and whole.selections is not None
    assert halves.selections.shape == (whole.selections.shape[0], PROMPT_LEN + short, whole.selections.shape[2])
    assert torch.equal(halves.selections, whole.selections)


@pytest.mark.parametrize("arch", ARCHS)
async def test_one_long_prompt_goes_on_as_two_pieces(tiny_models: dict[str, Path], arch: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """One prompt of PIPELINE_ROWS rows or more (lowered here) is cut at half its rows after the
    first layer that called peers. The second piece attends to the first's K/V, so each of its
    layers waits for the first's, even when the first piece's holders answer later (slowed
    here): the step gives transformers' logits, and the token and selections it gives whole."""
    model_dir = tiny_models[arch]
    ids, expected, _ = transformers_outputs(model_dir)
    forks = record_forks(monkeypatch)
    layers, gather = decode.Decoder._layers, decode.gather
    first_piece = contextvars.ContextVar("first_piece", default=False)

    async def marked(self: decode.Decoder, run: Any, fork: bool = False) -> Any:
        if run.batch.cut_after:
            first_piece.set(True)  # this task's context only
        return await layers(self, run, fork)

    async def gather_late(runs: Any) -> Any:
        done = await gather(runs)
        if first_piece.get():
            await asyncio.sleep(0.05)  # the second piece's outputs come first
        return done

    monkeypatch.setattr(decode.Decoder, "_layers", marked)
    monkeypatch.setattr(decode, "gather", gather_late)
    results = await whole_then_halves(model_dir, monkeypatch, ids, {"a": PROMPT_LEN})
    assert forks == [[PROMPT_LEN // 2, PROMPT_LEN - PROMPT_LEN // 2]]  # the second step only
    whole, pieces = results
    for result in results:
        assert result.logits is not None and result.logits.shape[0] == 1
        assert (result.logits[0] - expected[PROMPT_LEN - 1]).abs().max().item() <= ATOL
    assert len(pieces.tokens) == 1 and pieces.tokens[0] is not None and whole.tokens[0] is not None
    assert pieces.tokens[0].token_id == whole.tokens[0].token_id
    assert pieces.selections is not None and whole.selections is not None
    assert torch.equal(pieces.selections, whole.selections)


async def test_a_half_that_fails_fails_its_step_and_the_other_half_stops(qwen_tiny: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The second half raises while the first still runs: the step fails with the error, the
    first half is cancelled rather than left running past its step, and the home goes on."""
    ids, expected, _ = transformers_outputs(qwen_tiny)
    monkeypatch.setattr(decode_batch, "PIPELINE_ROWS", 8)
    layers = decode.Decoder._layers
    cancelled = asyncio.Event()

    async def failing(self: decode.Decoder, run: Any, fork: bool = False) -> Any:
        if fork or not run.batch.offset and len(run.batch.spans) != 1:
            return await layers(self, run, fork)  # the whole step, or a step that is no half
        if run.batch.offset:  # the second half
            raise RuntimeError("the second half failed")
        try:  # the first half: still running when the second fails
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with local_cluster(qwen_tiny, 3, expert_memory=2 * expert_bytes(qwen_tiny)) as cluster:
        async with cluster.engine() as engine:
            await engine.refresh()
            home = cluster.clients[0]
            for rid in ("a", "b"):
                await home.adopt_kv(rid, PROMPT_LEN + 1, PROMPT_LEN, [], prefill_here=True)
            monkeypatch.setattr(decode.Decoder, "_layers", failing)
            with pytest.raises(AgentFailed, match="the second half failed"):
                await home.decode_step([DecodeSpan(request_id=RequestId(rid), token_ids=tuple(ids), position=0)
                                        for rid in ("a", "b")])
            assert cancelled.is_set()
            monkeypatch.setattr(decode.Decoder, "_layers", layers)
            await home.release("a")
            await home.release("b")
            await home.adopt_kv("c", PROMPT_LEN + 1, PROMPT_LEN, [], prefill_here=True)
            result = await home.decode_step([DecodeSpan(request_id=RequestId("c"), token_ids=tuple(ids), position=0)],
                                            logits=True)
            assert result.logits is not None
            assert (result.logits[0] - expected[PROMPT_LEN - 1]).abs().max().item() <= ATOL


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
