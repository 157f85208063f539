from __future__ import annotations

import math

import torch

from protos.sampling import sample, token_generator
from scheduler.types import SamplingParams


def test_greedy_picks_argmax_and_reports_logprobs() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0])
    ev = sample(logits, SamplingParams(max_tokens=1, temperature=0, logprobs=True, top_logprobs=2), token_generator(0, 0))
    assert ev.token_id == 1
    expected = torch.log_softmax(logits, -1)
    assert ev.logprob is not None and math.isclose(ev.logprob, float(expected[1]), rel_tol=1e-6)
    assert [t for t, _ in ev.top_logprobs] == [1, 3]


def test_seed_reproduces_and_top_p_restricts() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.3, seed=7)
    a = [sample(logits, params, token_generator(7, i)).token_id for i in range(30)]
    b = [sample(logits, params, token_generator(7, i)).token_id for i in range(30)]
    assert a == b and len(set(a)) > 1  # the same draws for the same (seed, index); not one draw repeated
    assert [sample(logits, params, token_generator(8, i)).token_id for i in range(30)] != a
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True).tolist()
    cum, allowed = 0.0, set()
    for t in order:
        allowed.add(t)
        cum += float(probs[t])
        if cum >= 0.3:
            break
    assert set(a) <= allowed


def test_stop_token_is_flagged() -> None:
    ev = sample(torch.tensor([0.0, 5.0]), SamplingParams(max_tokens=1, temperature=0, stop_token_ids=frozenset({1})), token_generator(0, 0))
    assert ev.is_stop and ev.logprob is None
