"""The activation window against plain counting: selections, co-selected pairs, the window's
edge, and the JSON the admin API serves."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch

from protos.ids import ExpertId, NodeId
from scheduler.activations import FOLD_TOKENS, ActivationWindow

A, B = NodeId("a"), NodeId("b")


def steps(seed: int, layers: int, experts: int, k: int, n: int) -> list[torch.Tensor]:
    """n decode steps of 1-5 tokens, each token choosing k distinct experts per layer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.randint(1, 5)
        out.append(torch.tensor([[rng.sample(range(experts), k) for _ in range(t)] for _ in range(layers)],
                                dtype=torch.int16))
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_counts_and_pairs_equal_plain_counting(k: int) -> None:
    moe_layers, E = (1, 3), 6
    window = ActivationWindow(moe_layers, E)
    counts: Counter[ExpertId] = Counter()
    pairs: Counter[tuple[ExpertId, ExpertId]] = Counter()
    for i, sel in enumerate(steps(k, len(moe_layers), E, k, 40)):
        window.add(A, sel, now=float(i))
        for l, layer in enumerate(moe_layers):
            for token in sel[l].tolist():
                counts.update(ExpertId(layer, e) for e in token)
                pairs.update((ExpertId(layer, a), ExpertId(layer, b)) for a, b in itertools.combinations(sorted(token), 2))
    acts = window.activations(now=40.0)
    assert acts.counts[A] == {e: float(n) for e, n in counts.items()}
    assert acts.pairs[A] == {p: float(n) for p, n in pairs.items()}
    assert window.window(40.0)[A].tokens == sum(len(s[0]) for s in steps(k, len(moe_layers), E, k, 40))


def test_buckets_leave_the_window_and_homes_are_kept_apart() -> None:
    window = ActivationWindow((0,), 4, window_s=30.0, bucket_s=10.0)
    one = torch.tensor([[[0, 1]]], dtype=torch.int16)  # 1 layer, 1 token, k=2
    window.add(A, one, now=0.0)  # bucket [0, 10)
    window.add(A, one, now=5.0)
    window.add(A, torch.tensor([[[2, 3]]], dtype=torch.int16), now=12.0)  # bucket [12, 22)
    window.add(B, one, now=13.0)
    assert window.window(20.0)[A].tokens == 3
    assert window.activations(29.9).counts[A][ExpertId(0, 0)] == 2.0
    later = window.activations(31.0)  # the first bucket began 31 s ago: out of the window
    assert ExpertId(0, 0) not in later.counts[A] and later.counts[A][ExpertId(0, 2)] == 1.0
    assert later.counts[B] == {ExpertId(0, 0): 1.0, ExpertId(0, 1): 1.0}
    assert window.window(45.0) == {}  # everything aged out


def test_json_gives_counts_entropy_and_top_pairs() -> None:
    window = ActivationWindow((0, 1), 4)
    sel = torch.tensor([[[0, 1], [0, 1], [0, 2]], [[3, 3 - 1], [3, 2], [3, 2]]], dtype=torch.int16)
    window.add(A, sel, now=0.0)
    doc = window.to_json(now=1.0, top_pairs=2)
    first, second = doc["homes"]["a"]["layers"]
    assert doc["homes"]["a"]["tokens"] == 3
    assert first["counts"] == [3, 2, 1, 0] and first["top_pairs"] == [[0, 1, 2], [0, 2, 1]]
    assert second["layer"] == 1 and second["counts"] == [0, 0, 3, 3] and second["top_pairs"] == [[2, 3, 3]]
    assert second["entropy_bits"] == 1.0 and 1.0 < first["entropy_bits"] < 2.0


def test_selections_of_the_wrong_shape_or_range_are_refused() -> None:
    window = ActivationWindow((0, 1), 4)
    with pytest.raises(ValueError, match="MoE layers"):
        window.add(A, torch.zeros(3, 1, 2, dtype=torch.int16), now=0.0)
    with pytest.raises(ValueError, match="outside"):
        window.add(A, torch.full((2, 1, 2), 4, dtype=torch.int16), now=0.0)


def test_steps_counted_in_batches_across_homes_and_buckets_equal_plain_counting() -> None:
    """Past FOLD_TOKENS the steps kept aside are counted together: homes interleaved and buckets
    crossed on the way give what counting each step alone gives."""
    window = ActivationWindow((0, 2), 6, window_s=1000.0, bucket_s=7.0)
    plain = {A: Counter[ExpertId](), B: Counter[ExpertId]()}
    tokens = {A: 0, B: 0}
    sels = steps(9, 2, 6, 2, 300)
    assert sum(s.shape[1] for s in sels) > 2 * FOLD_TOKENS  # counted in several batches, and at the read
    for i, sel in enumerate(sels):
        home = A if i % 3 else B
        window.add(home, sel, now=i * 0.1)
        tokens[home] += sel.shape[1]
        for l, layer in enumerate((0, 2)):
            for token in sel[l].tolist():
                plain[home].update(ExpertId(layer, e) for e in token)
    acts, now = window.activations(now=30.0), window.window(30.0)
    for home in (A, B):
        assert acts.counts[home] == {e: float(n) for e, n in plain[home].items()}
        assert now[home].tokens == tokens[home]
