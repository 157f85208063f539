"""SlimCaching against brute force on tiny instances: the top-1 greedy against its (1 - 1/e) bound,
the top-k decomposition against the exact pair-latency optimum, the (max,+) convolution against
enumeration, and an instance where caching one expert of an always-together pair is worthless."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from protos.ids import ExpertId, NodeId
from scheduler.placement.problem import Activations, PlacementProblem, check_placement, expected_s
from scheduler.placement.slimcaching import (greedy_place, max_plus, pair_latency_s, pair_saved_s, place,
                                             saved_s)
from tests.unit import placement_support as ps

# (slots of a, b, c; layers; experts per layer); 2:2:2 on 2 x 3 experts would be 10k placements
CASES = [((1, 1, 2), (0,), 4), ((1, 1, 2), (0, 1), 3), ((1, 1, 1), (0,), 4), ((1, 1, 1), (0, 1), 3),
         ((2, 2, 2), (0,), 4)]
SEEDS = [0, 1, 2]


def _devices(slots: tuple[int, ...]) -> list[ps.Device]:
    return [ps.device(name, s) for name, s in zip("abc", slots)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("slots,layers,experts", CASES)
def test_top1_greedy_near_optimum(slots: tuple[int, ...], layers: tuple[int, ...], experts: int, seed: int) -> None:
    problem = ps.problem(_devices(slots), layers, experts, top_k=1, seed=seed)
    placement = place(problem)
    check_placement(problem, placement)
    assert set(placement) == {d.node for d in problem.devices}
    _, best = ps.optimum(problem, expected_s)
    ratio = saved_s(problem, placement) / saved_s(problem, best)
    print(f"top-1 slots={slots} layers={layers} experts={experts} seed={seed}: greedy/optimum = {ratio:.4f}")
    assert ratio >= 1 - 1 / math.e
    assert ratio >= 0.95


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("slots,layers,experts", CASES)
def test_top2_decomposition_near_optimum(slots: tuple[int, ...], layers: tuple[int, ...], experts: int,
                                         seed: int) -> None:
    problem = ps.problem(_devices(slots), layers, experts, top_k=2, seed=seed)
    placement = place(problem)
    check_placement(problem, placement)
    assert set(placement) == {d.node for d in problem.devices}
    _, best = ps.optimum(problem, pair_latency_s)
    ratio = pair_saved_s(problem, placement) / pair_saved_s(problem, best)
    greedy = pair_saved_s(problem, greedy_place(problem)) / pair_saved_s(problem, best)
    print(f"top-2 slots={slots} layers={layers} experts={experts} seed={seed}: decomposition/optimum = {ratio:.4f}"
          f" (per-expert greedy {greedy:.4f})")
    assert ratio >= 0.95


def test_top2_pair_latency_is_the_slower_expert() -> None:
    """For top_k == 2 each token is one pair, so the objective is exactly the per-token max."""
    problem = ps.problem(_devices((1, 1, 2)), (0,), 4, top_k=2, seed=3)
    placement = {NodeId("a"): frozenset({ExpertId(0, 0)}), NodeId("c"): frozenset({ExpertId(0, 1), ExpertId(0, 2)})}
    tokens = sum(sum(p.values()) for p in problem.activations.pairs.values())
    assert tokens == 3 * 200  # one pair per token, 200 tokens per home
    direct = sum(c * max(problem.access_s(placement, h, a), problem.access_s(placement, h, b))
                 for h, pairs in problem.activations.pairs.items() for (a, b), c in pairs.items())
    assert pair_latency_s(problem, placement) == pytest.approx(direct)


def test_top3_runs_and_saves() -> None:
    problem = ps.problem(_devices((1, 2, 2)), (0, 1), 4, top_k=3, seed=4)
    placement = place(problem)
    check_placement(problem, placement)
    assert pair_saved_s(problem, placement) > 0
    assert place(problem) == placement  # deterministic


@pytest.mark.parametrize("seed", range(20))
def test_max_plus_matches_enumeration(seed: int) -> None:
    rng = random.Random(seed)
    f = [rng.uniform(-5, 5) for _ in range(rng.randint(1, 6))]
    g = [rng.uniform(-5, 5) for _ in range(rng.randint(1, 6))]
    values, picks = max_plus(f, g)
    assert len(values) == len(f) + len(g) - 1
    for c, (value, s) in enumerate(zip(values, picks)):
        direct = max(g[s2] + f[c - s2] for s2 in range(len(g)) if 0 <= c - s2 < len(f))
        assert value == pytest.approx(direct)
        assert 0 <= c - s < len(f) and g[s] + f[c - s] == value


def _together_problem() -> PlacementProblem:
    """One home, 5 experts, top-2. Expert 0 is the most popular but its partner varies (1 or 2);
    experts 3 and 4 are always chosen together. Two slots: by count a per-expert greedy takes 0 and
    then one of 3/4, which saves nothing when a token waits for its slower expert."""
    home = NodeId("a")
    e = [ExpertId(0, i) for i in range(5)]
    pairs = {(e[0], e[1]): 50.0, (e[0], e[2]): 50.0, (e[3], e[4]): 70.0}
    counts: dict[ExpertId, float] = {}
    for (x, y), c in pairs.items():
        counts[x] = counts.get(x, 0.0) + c
        counts[y] = counts.get(y, 0.0) + c
    acts = Activations({home: counts}, {home: pairs})
    return PlacementProblem((ps.device("a", 2),), (0,), 5, 2, ps.EXPERT_BYTES, ps.TOKEN_BYTES,
                            flops_per_token=2 * 3 * 512 * 768, activations=acts)


def test_coactivated_pair_cached_together() -> None:
    problem = _together_problem()
    three, four = ExpertId(0, 3), ExpertId(0, 4)
    per_expert = greedy_place(problem)[NodeId("a")]
    assert ExpertId(0, 0) in per_expert and len(per_expert & {three, four}) == 1
    assert pair_saved_s(problem, greedy_place(problem)) == pytest.approx(0.0)
    cached = place(problem)[NodeId("a")]
    assert cached == {three, four}
    _, best = ps.optimum(problem, pair_latency_s)
    assert pair_saved_s(problem, {NodeId("a"): cached}) == pytest.approx(pair_saved_s(problem, best))


def test_pair_both_or_neither_with_spare_room() -> None:
    """With three slots the best is 0 with both its partners (100 tokens), not the 3/4 pair (70)
    plus a useless third; either way the always-together pair is cached whole or not at all. Needs
    a group of three: pairs and singles alone reach only the 70."""
    problem = _together_problem()
    bigger = PlacementProblem((ps.device("a", 3),), *[getattr(problem, f) for f in (
        "layers", "num_experts", "top_k", "expert_bytes", "token_bytes", "flops_per_token", "activations")])
    cached = place(bigger)[NodeId("a")]
    assert len(cached & {ExpertId(0, 3), ExpertId(0, 4)}) in (0, 2)
    assert cached == {ExpertId(0, 0), ExpertId(0, 1), ExpertId(0, 2)}
    _, best = ps.optimum(bigger, pair_latency_s)
    assert pair_saved_s(bigger, place(bigger)) == pytest.approx(pair_saved_s(bigger, best))


def test_top1_greedy_is_the_greedy() -> None:
    """Against a plain reference greedy that re-scores every (device, expert) pair each step."""
    problem = ps.problem(_devices((2, 1, 2)), (0, 1), 3, top_k=1, seed=5)
    held: dict[NodeId, frozenset[ExpertId]] = {d.node: frozenset() for d in problem.devices}
    while True:
        options = [(saved_s(problem, {**held, n: held[n] | {e}}) - saved_s(problem, held), n, e)
                   for n, e in itertools.product(held, problem.experts())
                   if e not in held[n] and len(held[n]) < problem.slots(n)]
        if not options or max(o[0] for o in options) <= 1e-12:
            break
        _, n, e = max(options, key=lambda o: o[0])
        held[n] = held[n] | {e}
    assert saved_s(problem, greedy_place(problem)) == pytest.approx(saved_s(problem, held))
