"""The three baseline policies (uniform, replicate-popular, EPLB) on placement_support's tiny instances: each is a
valid, deterministic placement, covers what it must, leaves out what it should, and does what its policy promises,
EPLB against the brute-force best balance."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from types import ModuleType

import pytest

from protos.ids import ExpertId, NodeId
from scheduler.placement import POLICIES as REGISTRY
from scheduler.placement import eplb, replicate_popular, uniform
from scheduler.placement.problem import (Activations, Placement, PlacementProblem, check_placement, remote_calls,
                                         uncovered)
from tests.unit.placement_support import EXPERT_BYTES, TOKEN_BYTES, device, optimum, problem

POLICIES = [uniform, replicate_popular, eplb]


def _instance(slots: tuple[int, ...], layers: tuple[int, ...] = (0,), num_experts: int = 4, top_k: int = 1,
              seed: int = 0, tokens: int = 200) -> PlacementProblem:
    return problem([device(name, s) for name, s in zip("abc", slots)], layers, num_experts, top_k, tokens, seed)


# (slots, layers, experts): pooled slots equal to, above, and below the experts; one device without memory
SHAPES = [((1, 1, 2), (0,), 4), ((2, 2, 4), (0,), 4), ((2, 2, 4), (0, 1), 3), ((1, 1, 2), (0, 1), 4),
          ((1, 1, 2), (0, 1, 2), 3), ((0, 2, 3), (0, 1), 2)]
SEEDS = (0, 1, 2)
INSTANCES = [_instance(s, layers, n, seed=seed) for s, layers, n in SHAPES for seed in SEEDS]


def _ids(p: PlacementProblem) -> str:
    slots = "-".join(str(p.slots(d.node)) for d in p.devices)
    return f"slots{slots}_L{len(p.layers)}_E{p.num_experts}"


def _pooled(p: PlacementProblem) -> int:
    return sum(p.slots(d.node) for d in p.devices)


def _load(p: PlacementProblem) -> dict[ExpertId, float]:
    """Selections per expert summed over homes, computed here rather than taken from the policies."""
    return {e: sum(c.get(e, 0.0) for c in p.activations.counts.values()) for e in p.experts()}


def _copies(placement: Placement) -> dict[ExpertId, int]:
    copies: dict[ExpertId, int] = {}
    for held in placement.values():
        for e in held:
            copies[e] = copies.get(e, 0) + 1
    return copies


def _max_load(p: PlacementProblem, placement: Placement) -> float:
    return max(eplb.device_loads(p, placement).values())


@pytest.mark.parametrize("policy", POLICIES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
@pytest.mark.parametrize(("p", "seed"), [(p, i % len(SEEDS)) for i, p in enumerate(INSTANCES)],
                         ids=[_ids(p) for p in INSTANCES])
def test_valid_total_and_deterministic(policy: ModuleType, p: PlacementProblem, seed: int) -> None:
    placement = policy.place(p)
    check_placement(p, placement)
    assert set(placement) == {d.node for d in p.devices}
    assert policy.place(p) == placement
    # built again from the same seed, an equal problem: the result depends on nothing but its value
    again = _instance(tuple(p.slots(d.node) for d in p.devices), p.layers, p.num_experts, seed=seed)
    assert again == p and policy.place(again) == placement


@pytest.mark.parametrize("policy", POLICIES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
@pytest.mark.parametrize("p", INSTANCES, ids=_ids)
def test_covers_every_expert_or_fills_every_slot(policy: ModuleType, p: PlacementProblem) -> None:
    placement = policy.place(p)
    experts = len(p.experts())
    if _pooled(p) >= experts:
        assert uncovered(p, placement) == []
    else:
        # every slot used, no expert twice: exactly the pooled slots' worth of distinct experts
        assert sum(len(h) for h in placement.values()) == _pooled(p)
        assert len(set().union(*placement.values())) == _pooled(p)


SHORT = [p for p in INSTANCES if _pooled(p) < len(p.experts())]


def _kept_per_layer(p: PlacementProblem, placement: Placement) -> dict[int, set[int]]:
    held = set().union(*placement.values())
    return {layer: {e.index for e in held if e.layer == layer} for layer in p.layers}


@pytest.mark.parametrize("p", SHORT, ids=_ids)
def test_uniform_short_of_slots_leaves_out_the_highest_indices_evenly(p: PlacementProblem) -> None:
    q, rho = divmod(_pooled(p), len(p.layers))
    kept = _kept_per_layer(p, uniform.place(p))
    assert [kept[layer] for layer in p.layers] == [set(range(q + (i < rho))) for i in range(len(p.layers))]


@pytest.mark.parametrize("p", SHORT, ids=_ids)
def test_eplb_short_of_slots_leaves_out_the_least_loaded_evenly(p: PlacementProblem) -> None:
    load = _load(p)
    kept = _kept_per_layer(p, eplb.place(p))
    sizes = [len(kept[layer]) for layer in p.layers]
    assert sum(sizes) == _pooled(p) and max(sizes) - min(sizes) <= 1
    for layer, indices in kept.items():
        dropped = set(range(p.num_experts)) - indices
        assert min(load[ExpertId(layer, i)] for i in indices) >= max(load[ExpertId(layer, i)] for i in dropped)


@pytest.mark.parametrize("p", SHORT, ids=_ids)
def test_replicate_popular_short_of_slots_leaves_out_the_least_popular(p: PlacementProblem) -> None:
    load = _load(p)
    held = set().union(*replicate_popular.place(p).values())
    assert min(load[e] for e in held) >= max(load[e] for e in set(p.experts()) - held)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("num_layers", [1, 2, 3, 5])
@pytest.mark.parametrize("num_experts", [2, 4, 7, 8])
def test_uniform_spreads_each_layer_in_proportion_to_slots(k: int, num_layers: int, num_experts: int) -> None:
    # the benchmark's unlike devices, slots 1:1:2; uniform ignores the statistics, so few tokens will do
    p = _instance((k, k, 2 * k), tuple(range(num_layers)), num_experts, tokens=2)
    placement = uniform.place(p)
    check_placement(p, placement)
    assert sum(_copies(placement).values()) == min(_pooled(p), len(p.experts()))
    assert max(_copies(placement).values()) == 1
    for layer in p.layers:
        counts = {n: sum(e.layer == layer for e in held) for n, held in placement.items()}
        kept = sum(counts.values())
        for node, count in counts.items():
            assert abs(count - Fraction(kept * p.slots(node), _pooled(p))) < 1, (layer, counts)


# memory to spare (pooled slots at least twice the experts): what replication is for
SPARE = [_instance(s, layers, n, top_k, seed) for s, layers, n in [((2, 2, 4), (0,), 4), ((3, 3, 6), (0,), 6),
                                                                    ((3, 3, 6), (0, 1), 3), ((4, 4, 8), (0, 1), 4)]
         for top_k in (1, 2) for seed in range(5)]


@pytest.mark.parametrize("p", SPARE, ids=_ids)
def test_replicate_popular_makes_fewer_remote_calls_than_uniform(p: PlacementProblem) -> None:
    assert remote_calls(p, replicate_popular.place(p)) <= remote_calls(p, uniform.place(p))


@pytest.mark.parametrize("p", INSTANCES + SPARE, ids=_ids)
def test_replicate_popular_fills_every_memory(p: PlacementProblem) -> None:
    placement = replicate_popular.place(p)
    for d in p.devices:
        assert len(placement[d.node]) == min(p.slots(d.node), len(p.experts()))


# one layer, slots 1:1:2, a few seeds: small enough to enumerate every placement
BALANCE = [_instance(s, (0,), n, top_k, seed) for s, n in [((1, 1, 2), 4), ((1, 1, 2), 6), ((2, 2, 4), 4),
                                                            ((2, 2, 4), 5)]
           for top_k in (1, 2) for seed in range(4)]


@pytest.mark.parametrize("p", BALANCE, ids=_ids)
def test_eplb_balance_is_near_the_brute_force_optimum(p: PlacementProblem) -> None:
    placement = eplb.place(p)
    copies = _copies(placement)

    def same_replicas(other: Placement) -> bool:
        return _copies(other) == copies

    best, _ = optimum(p, _max_load, same_replicas)
    assert _max_load(p, placement) <= best / 0.95


@pytest.mark.parametrize("p", BALANCE + SPARE, ids=_ids)
def test_eplb_gives_heavier_experts_more_replicas(p: PlacementProblem) -> None:
    load, copies = _load(p), _copies(eplb.place(p))
    for a in p.experts():
        for b in p.experts():
            if a.layer == b.layer and load[a] > load[b]:
                assert copies.get(a, 0) >= copies.get(b, 0), (a, b)
    if _pooled(p) > len(p.experts()):
        heaviest = max(p.experts(), key=lambda e: load[e])
        assert copies[heaviest] > 1


def _by_hand(slots: dict[str, int], load: list[float]) -> PlacementProblem:
    """One layer, one home, the given selections per expert."""
    acts = Activations({NodeId("a"): {ExpertId(0, i): c for i, c in enumerate(load)}})
    return PlacementProblem(tuple(device(n, s) for n, s in slots.items()), (0,), len(load), 1, EXPERT_BYTES,
                            TOKEN_BYTES, 1e6, acts)


def test_eplb_spends_spare_slots_on_the_most_load_per_copy() -> None:
    # 3 spare slots: expert 0 (100 per copy, then 50, then 33) takes copies until it is on every device, and
    # only then does the next spare go to an expert with 1 per copy (round-robin would give 2, 2, 2, 1, 1, 1)
    p = _by_hand({"a": 3, "b": 3, "c": 3}, [100.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    placement = eplb.place(p)
    assert [_copies(placement)[ExpertId(0, i)] for i in range(6)] == [3, 2, 1, 1, 1, 1]


def test_eplb_seats_no_more_copies_than_devices_can_hold() -> None:
    # a and b must each hold all three experts, so expert 0 cannot take the four copies its load asks for
    p = _by_hand({"a": 3, "b": 3, "c": 1}, [100.0, 1.0, 1.0])
    placement = eplb.place(p)
    check_placement(p, placement)
    assert [len(placement[NodeId(n)]) for n in "abc"] == [3, 3, 1]
    assert placement[NodeId("c")] == {ExpertId(0, 0)}


def test_eplb_moves_replicas_when_the_greedy_packing_corners_itself() -> None:
    # found by search: packing replicas heaviest first leaves b's last free slot to an expert b already holds
    p = _by_hand({"a": 5, "b": 3}, [17.0, 11.0, 17.0, 15.0, 16.0])
    placement = eplb.place(p)
    check_placement(p, placement)
    assert len(placement[NodeId("a")]) == 5 and len(placement[NodeId("b")]) == 3
    assert [_copies(placement)[ExpertId(0, i)] for i in range(5)] == [2, 1, 2, 1, 2]


def test_device_loads_share_each_expert_among_its_holders_per_slot() -> None:
    p = _by_hand({"a": 2, "b": 4, "c": 0}, [10.0, 4.0])
    placement: Placement = {NodeId("a"): frozenset({ExpertId(0, 0), ExpertId(0, 1)}),
                            NodeId("b"): frozenset({ExpertId(0, 0)})}
    assert eplb.device_loads(p, placement) == {"a": (5.0 + 4.0) / 2, "b": 5.0 / 4, "c": 0.0}



def test_every_policy_is_registered_and_gives_a_valid_placement() -> None:
    assert set(REGISTRY) == {"prism", "slimcaching", "eplb", "uniform", "replicate-popular"}
    p = problem([device("a", 2), device("b", 2), device("c", 4)], layers=(0, 1), num_experts=4, top_k=2, seed=3)
    for name, place in REGISTRY.items():
        placement = place(p)
        check_placement(p, placement)
        assert set(placement) == {"a", "b", "c"}, name
        if name != "slimcaching":  # it minimises latency; the others cover every expert the slots can hold
            assert not uncovered(p, placement), name


def test_an_unheld_expert_is_priced_as_the_runtime_serves_it_whole_or_split() -> None:
    p = problem([device("a", 2), device("b", 2), device("c", 2)])  # 50 MB/s disks, 1 ms links
    e, home, nobody = ExpertId(0, 3), NodeId("a"), {NodeId(n): frozenset() for n in "abc"}
    whole = p.access_s(nobody, home, e)
    assert whole == pytest.approx(EXPERT_BYTES / 50e6 + p.compute_s(home))  # read whole by the home
    split = dataclasses.replace(p, split_unheld=True).access_s(nobody, home, e)
    # The slowest slice: a third of the read on another agent, and a call to it.
    third = EXPERT_BYTES // 3 / 50e6 + p.compute_s(home) / 3 + p.call_s(home, NodeId("b")) - p.compute_s(home)
    assert split == pytest.approx(third) and split < whole


def test_with_the_load_balance_an_unheld_expert_is_priced_as_the_balance_runs_it() -> None:
    """Without it, the runtime splits over every agent, and the price is the slowest slice: the
    home's tenth-speed disk reading a third. With it, the balance leaves that disk out, as the
    decode tables do, and the price is what its run takes: lower."""
    p = problem([device("a", 2, disk=5e6), device("b", 2), device("c", 2)])
    home, nobody, e = NodeId("a"), {NodeId(n): frozenset() for n in "abc"}, ExpertId(0, 3)
    every = dataclasses.replace(p, split_unheld=True)
    assert every.access_s(nobody, home, e) >= EXPERT_BYTES // 3 / 5e6  # its own third on its slow disk
    balanced = dataclasses.replace(p, split_unheld=True, load_balance=True)
    # Halves on the two fast disks, each a call away: a half's read and a round trip, about.
    half = EXPERT_BYTES / 2 / 50e6 + 2 * 0.001
    assert balanced.access_s(nobody, home, e) == pytest.approx(half, rel=0.05)
    assert balanced.access_s(nobody, home, e) < every.access_s(nobody, home, e)
    # On like disks its split is every device's, as without it.
    alike = problem([device("a", 2), device("b", 2), device("c", 2)])
    on, off = (dataclasses.replace(alike, split_unheld=True, load_balance=lb) for lb in (True, False))
    assert on.access_s(nobody, home, e) == pytest.approx(off.access_s(nobody, home, e), rel=0.05)
