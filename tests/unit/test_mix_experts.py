"""`slots.mix_experts`, decode's weighted sum of the experts an agent holds over a batch's
(token, slot) pairs: against each pair computed on its own, and against the grouped path of
prefill (`add_experts`)."""

from __future__ import annotations

import pytest
import torch

from node_agent.model import slots
from node_agent.model.moe import ExpertWeights, swiglu

D, UNITS, EXPERTS, K = 16, 24, 8, 2


def _experts(seed: int) -> dict[int, ExpertWeights]:
    g = torch.Generator().manual_seed(seed)
    return {e: ExpertWeights(torch.randn(UNITS, D, generator=g), torch.randn(UNITS, D, generator=g),
                             torch.randn(D, UNITS, generator=g)) for e in range(EXPERTS)}


def _pairwise(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: dict[int, ExpertWeights]
              ) -> torch.Tensor:
    """Every (token, slot) pair whose expert is held, on its own row."""
    out = torch.zeros_like(x)
    for t in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            if e in experts:
                out[t] += swiglu(experts[e], x[t:t + 1])[0] * weights[t, s]
    return out


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_mixed_experts_are_the_sum_of_each_pair(rows: int) -> None:
    experts = _experts(rows)
    held = {e: w for e, w in experts.items() if e % 3}  # some experts held elsewhere
    g = torch.Generator().manual_seed(100 + rows)
    for _ in range(20):
        x = torch.randn(rows, D, generator=g)
        ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:K] for _ in range(rows)])
        ids[torch.rand(rows, K, generator=g) < 0.2] = -1  # slots not this agent's
        weights = torch.rand(rows, K, generator=g)
        got = slots.mix_experts(x, ids, weights, held)
        want = _pairwise(x, ids, weights, held)
        if not any(int(e) in held for e in ids.flatten()):
            assert got is None
            continue
        assert got is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        grouped = torch.zeros_like(x)
        slots.add_experts(grouped, x, ids, weights, held)
        torch.testing.assert_close(got, grouped, rtol=1e-5, atol=1e-4)


def test_one_pair_per_expert_gives_the_pairs_own_sums_exactly() -> None:
    """With every expert on one row (a decode step's usual case), each row's output is its
    experts' weighted outputs added in slot order, bit for bit."""
    experts = _experts(7)
    x = torch.randn(4, D)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    weights = torch.rand(4, K)
    got = slots.mix_experts(x, ids, weights, experts)
    assert got is not None
    for t in range(4):
        a, b = (swiglu(experts[int(e)], x[t:t + 1]) * weights[t, s] for s, e in enumerate(ids[t]))
        assert torch.equal(got[t:t + 1], (torch.zeros(1, D) + a) + b)
