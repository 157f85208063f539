"""PRISM placement: entropy-sized layer slots, coverage repair, and the benefit it reaches against
the exact optimum of small instances (every placement enumerated)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pytest

from protos.ids import ExpertId, NodeId
from scheduler.placement import prism
from scheduler.placement.problem import (Activations, Device, Placement, PlacementProblem, check_placement,
                                         expected_s, remote_calls, uncovered)
from tests.unit.placement_support import EXPERT_BYTES, TOKEN_BYTES, device, optimum, problem

Cost = Callable[[PlacementProblem, Placement], float]


def handmade(devices: Sequence[Device], counts: Mapping[str, Mapping[tuple[int, int], float]],
             layers: Sequence[int] = (0,), num_experts: int = 4) -> PlacementProblem:
    """An instance with the given per-home counts, keyed (layer, index)."""
    acts = Activations({NodeId(h): {ExpertId(*k): c for k, c in own.items()} for h, own in counts.items()})
    return PlacementProblem(tuple(devices), tuple(layers), num_experts, 1, EXPERT_BYTES, TOKEN_BYTES,
                            flops_per_token=2 * 3 * 512 * 768, activations=acts)


def benefit_ratio(pb: PlacementProblem, cost: Cost, feasible: Callable[[Placement], bool] = lambda p: True) -> float:
    """What prism saves over holding nothing, as a share of what the best feasible placement saves."""
    best, _ = optimum(pb, cost, feasible)
    empty: Placement = {}
    return (cost(pb, empty) - cost(pb, prism.place(pb))) / (cost(pb, empty) - best)


def test_one_hot_layer_gets_one_slot_and_a_flat_layer_the_rest() -> None:
    counts = {"a": {(0, 2): 100.0, **{(1, e): 25.0 for e in range(4)}}}
    for slots, want in ((2, {0: 1, 1: 1}), (4, {0: 1, 1: 3}), (5, {0: 1, 1: 4}), (9, {0: 4, 1: 4})):
        pb = handmade([device("a", slots)], counts, layers=(0, 1))
        got = prism.layer_slots(pb, NodeId("a"))
        assert got == want, slots
        assert sum(got.values()) == min(slots, 8)
    pb = handmade([device("a", 4)], counts, layers=(0, 1))
    held = prism.fill(pb, NodeId("a"), prism.layer_slots(pb, NodeId("a")))
    assert {e for e in held if e.layer == 0} == {ExpertId(0, 2)}


def test_layer_slots_sum_to_the_device_slots() -> None:
    devices = [device("a", 1), device("b", 5), device("c", 13), device("d", 40)]
    pb = problem(devices, layers=(0, 1, 2, 3), num_experts=8, top_k=2, seed=3)
    for d in devices:
        got = prism.layer_slots(pb, d.node)
        assert sum(got.values()) == min(pb.slots(d.node), 32)
        assert all(0 <= k <= 8 for k in got.values())
        if pb.slots(d.node) >= 4:  # every layer has traffic from every home
            assert min(got.values()) >= 1


def test_idle_device_takes_slots_by_total_traffic() -> None:
    counts = {"a": {(0, 0): 30.0, (0, 1): 30.0, (1, 0): 20.0}}
    pb = handmade([device("a", 1), device("idle", 4)], counts, layers=(0, 1))
    assert prism.layer_slots(pb, NodeId("idle")) == {0: 3, 1: 1}
    assert len(prism.place(pb)[NodeId("idle")]) == 4


def test_apportion_splits_by_largest_remainder_under_the_cap() -> None:
    assert prism.apportion(3, {0: 1.0, 1: 1.0, 2: 1.0}, 4) == {0: 1, 1: 1, 2: 1}
    assert prism.apportion(4, {0: 1.0, 1: 1.0, 2: 1.0}, 4) == {0: 2, 1: 1, 2: 1}  # tie to the lower layer
    assert prism.apportion(2, {0: 1.0, 1: 3.0, 2: 2.0}, 4) == {0: 0, 1: 1, 2: 1}  # too few for one each
    assert prism.apportion(10, {0: 1.0, 1: 100.0, 2: 0.0}, 4) == {0: 4, 1: 4, 2: 2}  # zero weight last
    assert prism.apportion(5, {0: 0.0, 1: 0.0}, 4) == {0: 3, 1: 2}


def test_repair_trades_the_busiest_devices_duplicates_for_uncovered_experts() -> None:
    counts = {"a": {(0, 0): 10.0, (0, 2): 5.0, (0, 3): 1.0}, "b": {(0, 0): 10.0, (0, 3): 4.0},
              "c": {(0, 0): 10.0, (0, 1): 8.0}}
    pb = handmade([device("a", 1), device("b", 1), device("c", 2)], counts)
    e = [ExpertId(0, i) for i in range(4)]
    start = {NodeId("a"): frozenset({e[0]}), NodeId("b"): frozenset({e[0]}), NodeId("c"): frozenset({e[0], e[1]})}
    # All three hold one duplicate: a goes first and takes what it uses (2), then b takes 3.
    assert prism.repair(pb, start) == {"a": {e[2]}, "b": {e[3]}, "c": {e[0], e[1]}}


@pytest.mark.parametrize("seed", range(3))
def test_repair_covers_every_expert_when_the_slots_suffice(seed: int) -> None:
    devices = [device("a", 3), device("b", 7), device("c", 20), device("d", 0)]
    pb = problem(devices, layers=(0, 1, 2), num_experts=10, top_k=2, seed=seed)
    first = {d.node: prism.fill(pb, d.node, prism.layer_slots(pb, d.node)) for d in devices}
    assert uncovered(pb, first)  # each home's favourites overlap, so the fill alone leaves gaps
    for placement in (prism.repair(pb, first), prism.place(pb)):
        check_placement(pb, placement)
        assert set(placement) == {d.node for d in devices}
        assert all(len(placement[d.node]) <= pb.slots(d.node) for d in devices)
        assert not uncovered(pb, placement)


def test_repair_leaves_no_duplicate_when_the_slots_fall_short() -> None:
    pb = problem([device("a", 3), device("b", 4), device("c", 5)], layers=(0, 1), num_experts=8, top_k=2, seed=1)
    first = {d.node: prism.fill(pb, d.node, prism.layer_slots(pb, d.node)) for d in pb.devices}
    repaired = prism.repair(pb, first)
    assert sum(len(h) for h in repaired.values()) == len(set().union(*repaired.values())) == 12
    placement = prism.place(pb)  # the local search keeps as many experts held
    assert len(uncovered(pb, placement)) == 16 - 12


def test_place_is_deterministic_and_the_descent_never_loses() -> None:
    devices = [device("a", 2, flops=5e9), device("b", 3, latency=0.004), device("c", 6, link=12.5e6)]
    pb = problem(devices, layers=(0, 1), num_experts=6, top_k=2, seed=4)
    assert prism.place(pb) == prism.place(pb)
    first = {d.node: prism.fill(pb, d.node, prism.layer_slots(pb, d.node)) for d in devices}
    repaired = prism.repair(pb, first)
    improved = prism.improve(pb, repaired)
    assert expected_s(pb, improved) <= expected_s(pb, repaired)
    assert len(uncovered(pb, improved)) <= len(uncovered(pb, repaired))


# (slots of a, b, c; layers; experts a layer): pooled slots >= experts, unlike and equal slots.
COVERING = [((1, 1, 2), (0,), 4), ((2, 2, 2), (0,), 4), ((1, 1, 4), (0, 1), 3), ((2, 2, 2), (0, 1), 3)]


@pytest.mark.parametrize("slots,layers,num_experts", COVERING)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_remote_calls_saved_near_the_optimum_that_covers_every_expert(
        slots: tuple[int, ...], layers: tuple[int, ...], num_experts: int, top_k: int, seed: int) -> None:
    pb = problem([device(n, s) for n, s in zip("abc", slots)], layers, num_experts, top_k, seed=seed)
    assert not uncovered(pb, prism.place(pb))
    assert benefit_ratio(pb, remote_calls, lambda p: not uncovered(pb, p)) >= 0.95


@pytest.mark.parametrize("slots,layers,num_experts", [((1, 1, 2), (0, 1), 3), ((1, 1, 1), (0,), 4)])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_seconds_saved_near_the_optimum_when_slots_fall_short(
        slots: tuple[int, ...], layers: tuple[int, ...], num_experts: int, top_k: int, seed: int) -> None:
    pb = problem([device(n, s) for n, s in zip("abc", slots)], layers, num_experts, top_k, seed=seed)
    assert sum(slots) < len(pb.experts())
    assert benefit_ratio(pb, expected_s) >= 0.95


@pytest.mark.parametrize("slots", [(2, 2, 2), (1, 1, 2)])
@pytest.mark.parametrize("seed", range(2))
def test_seconds_saved_near_the_optimum_on_unequal_devices(slots: tuple[int, ...], seed: int) -> None:
    devices = [device("a", slots[0], flops=5e9, latency=0.004), device("b", slots[1], flops=40e9),
               device("c", slots[2], link=12.5e6, disk=200e6)]
    pb = problem(devices, layers=(0, 1), num_experts=3, top_k=2, seed=seed)
    covers = sum(slots) >= len(pb.experts())
    assert benefit_ratio(pb, expected_s, lambda p: not covers or not uncovered(pb, p)) >= 0.95
