"""The distributed path gives transformers' logits and greedy tokens, for any agent count and
any cache budget (real agents over real gRPC, real generated checkpoints)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from node_agent.model.synth import init_model
from scheduler.policy import Policy
from scheduler.types import GenerationRequest, RequestId, SamplingParams
from tests.conftest import ARCHS
from tests.integration.cluster import expert_bytes, local_cluster

PROMPT_LEN = 37  # divides evenly by none of 2 and 3 agents
ATOL = 1e-4


def reference(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def prompt(vocab: int, n: int = PROMPT_LEN, seed: int = 3) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def transformers_outputs(model_dir: Path) -> tuple[list[int], torch.Tensor, list[int]]:
    """The test prompt, transformers' logits [T, V] at its positions and its 16 greedy tokens."""
    ref = reference(model_dir)
    ids = prompt(ref.config.vocab_size)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
        greedy = ref.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    return ids, expected, greedy


POLICIES = [
    Policy.from_flags("sirius"),
    Policy.from_flags("naive"),
    Policy.from_flags("expert-parallel"),
    Policy.from_flags("sirius", no_interleave=True, no_token_scheduling=True, no_prefetch=True),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("agents", [1, 2, 3])
@pytest.mark.parametrize("budget_experts", [0, 2])  # 0 = unlimited; 2 experts forces evictions
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.label.replace(" ", ""))
async def test_prefill_logits_and_greedy_tokens_match_transformers(
    tiny_models: dict[str, Path], arch: str, agents: int, budget_experts: int, policy: Policy
) -> None:
    model_dir = tiny_models[arch]
    ids, expected, greedy = transformers_outputs(model_dir)
    size = expert_bytes(model_dir)
    async with local_cluster(model_dir, agents, expert_memory=budget_experts * size) as cluster:
        runner = cluster.runner(policy)
        logits = await runner.prefill_logits("prefill-1", ids)
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max().item() <= ATOL
        request = GenerationRequest(RequestId("gen-1"), tuple(ids), SamplingParams(max_tokens=16, temperature=0))
        # The policy steers a sequence-parallel prefill: every prompt goes that way here
        # (test_home_prefill.py checks prompts prefilled on their home).
        tokens = [event.token_id for event in await cluster.generate(request, policy, home_prefill_max=0)]
        assert tokens == greedy
        snaps = [await c.snapshot() for c in cluster.clients]
        for s in snaps:
            assert s.capacity_bytes == budget_experts * size
            if budget_experts:
                assert s.bytes_used <= s.capacity_bytes
        if budget_experts:
            assert sum(s.evictions for s in snaps) > 0
        if agents > 1:
            assert sum(s.bytes_sent for s in snaps) > 0  # tensors really crossed between agents


async def test_a_bfloat16_checkpoint_loads_and_matches_transformers(tmp_path: Path) -> None:
    """Published checkpoints are bfloat16: the agents read them and compute in float32 like the
    reference loaded in float32."""
    model_dir = init_model("mixtral", tmp_path / "bf16", "tiny", seed=4, dtype="bfloat16")
    ids = prompt(1000)
    with torch.no_grad():
        expected = reference(model_dir)(torch.tensor([ids])).logits[0]
    async with local_cluster(model_dir, 2) as cluster:
        logits = await cluster.runner().prefill_logits("bf16", ids)
    assert (logits - expected).abs().max().item() <= ATOL
