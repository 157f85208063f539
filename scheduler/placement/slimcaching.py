"""SlimCaching: storage-constrained expert caching at the edge, after the published system of that
name (expert caching on edge devices under storage limits, with guarantees). Each device caches at most
`problem.slots(node)` experts so that the homes' requests wait as little as possible, where one
(home, expert) access costs `problem.access_s`: local compute, else the cheapest holder's round
trip, else a read from the home's disk.

    PlacementProblem
      top_k == 1 (or no pair statistics) -> greedy_place: greedy on (device, expert) pairs
      top_k >= 2                         -> decompose_place: from empty caches and from the greedy,
          round over devices, the others' caches fixed        (successive greedy decomposition)
            per layer: v_l(s), s = 0..capacity               (_layer_values: greedy over co-selected groups)
            across layers: F_l = max_plus(F_{l-1}, v_l)      (split the capacity over layers)
          until no device's cache changes, at most MAX_ROUNDS rounds
      -> Placement

Top-1: the latency saved, `saved_s(P)` = expected_s(empty) - expected_s(P), is monotone submodular
in the set of (device, expert) pairs as long as a remote call is no slower than a disk read and no
faster than local compute (then an access costs the minimum over its options, a facility-location
function). The paper states (1 - 1/e) for its greedy; with equal expert sizes the capacities form a
partition matroid, for which the textbook bound of this plain greedy is 1/2 (Fisher, Nemhauser and
Wolsey, 1978). The tests hold it to (1 - 1/e), and 0.95, of the brute-force optimum on small cases.

Top-k: a token's layer waits for the slowest of its k experts (they run in parallel), so caching
one expert of a co-selected pair saves nothing while its partner stays slow, and the saving is no
longer submodular. `pair_latency_s` models a token's layer with the pair statistics: for top_k == 2
each token is exactly one pair and a home's layer costs sum over pairs of count(a, b) x
max(access(a), access(b)), which is exact. For top_k > 2 it is an approximation: a token's k
experts form C(k, 2) pairs, and the token is charged the mean over them of the pair max (the sum
scaled by 1 / C(k, 2), so the counts add up to tokens); this is a lower bound on the true max of k
but still sees which experts go together.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence

from protos.ids import ExpertId, NodeId
from scheduler.placement.problem import Placement, PlacementProblem, expected_s

MAX_ROUNDS = 8  # passes over the devices; coordinate descent usually settles in two or three
MAX_GROUP = 4  # co-selected experts a device may add to a layer in one step (a pair, or a hub and partners)
REL_TOL = 1e-12  # a device's new cache must cut the latency by more than this fraction (float noise)

# (home, other expert index, tokens) for the pairs an expert of one layer is part of
Incident = dict[int, list[tuple[NodeId, int, float]]]


def place(problem: PlacementProblem) -> Placement:
    """Each device's cache. Without pair statistics the top-k model has nothing to go on, so the
    per-expert greedy (the sequential-access model of `expected_s`) decides."""
    if problem.top_k == 1 or not any(problem.activations.pairs.values()):
        return greedy_place(problem)
    return decompose_place(problem)


def saved_s(problem: PlacementProblem, placement: Placement) -> float:
    """F(P): the seconds of expert accesses the placement saves over caching nothing (top-1)."""
    return expected_s(problem, {}) - expected_s(problem, placement)


def pair_latency_s(problem: PlacementProblem, placement: Placement) -> float:
    """The window's layer latencies under parallel expert calls: per token, the slowest of its pair
    (top_k == 2, exact) or the mean over its C(k, 2) pairs of the pair's slower one (top_k > 2)."""
    scale = 1.0 / math.comb(max(problem.top_k, 2), 2)
    return scale * sum(c * max(problem.access_s(placement, home, a), problem.access_s(placement, home, b))
                       for home, pairs in problem.activations.pairs.items() for (a, b), c in pairs.items())


def pair_saved_s(problem: PlacementProblem, placement: Placement) -> float:
    """The top-k objective: the layer latency the placement saves over caching nothing."""
    return pair_latency_s(problem, {}) - pair_latency_s(problem, placement)


def max_plus(prev: Sequence[float], layer: Sequence[float]) -> tuple[list[float], list[int]]:
    """(max,+) convolution: out[c] = max over s of layer[s] + prev[c - s], and the smallest s that
    reaches it (so ties leave slots free)."""
    out, pick = [-math.inf] * (len(prev) + len(layer) - 1), [0] * (len(prev) + len(layer) - 1)
    for s, v in enumerate(layer):
        for i, p in enumerate(prev):
            if v + p > out[s + i]:
                out[s + i], pick[s + i] = v + p, s
    return out, pick


def _column(holders: frozenset[NodeId], expert: ExpertId) -> Placement:
    """The placement restricted to one expert: an access to it depends on nothing else."""
    return {n: frozenset({expert}) for n in holders}


def _access(problem: PlacementProblem, holders: frozenset[NodeId], home: NodeId, expert: ExpertId) -> float:
    return problem.access_s(_column(holders, expert), home, expert)


# --- top-1: greedy over (device, expert) pairs -------------------------------------------------


def greedy_place(problem: PlacementProblem) -> Placement:
    """Add the (device, expert) pair of largest marginal saving, among devices with a free slot,
    until none saves anything. Adding (n, e) changes only expert e's accesses, so only column e's
    gains are recomputed; every live heap entry is exact (stale ones are skipped by version)."""
    homes = problem.activations.homes()
    order = {d.node: i for i, d in enumerate(problem.devices)}
    free = {d.node: problem.slots(d.node) for d in problem.devices}
    used = [e for e in problem.experts() if any(problem.activations.count(h, e) > 0 for h in homes)]
    holders: dict[ExpertId, frozenset[NodeId]] = {e: frozenset() for e in used}
    version = {e: 0 for e in used}

    def cost(e: ExpertId, held: frozenset[NodeId]) -> float:
        return sum(problem.activations.count(h, e) * _access(problem, held, h, e) for h in homes)

    def entries(e: ExpertId) -> list[tuple[float, int, ExpertId, int, NodeId]]:
        now = cost(e, holders[e])
        return [(cost(e, holders[e] | {n}) - now, order[n], e, version[e], n)
                for n in free if free[n] > 0 and n not in holders[e]]

    heap = [entry for e in used for entry in entries(e)]  # keyed by minus the gain: cost after - before
    heapq.heapify(heap)
    while heap:
        delta, _, e, v, n = heapq.heappop(heap)
        if v != version[e] or free[n] == 0:
            continue
        if delta >= 0:
            break  # the best remaining pair saves nothing; an empty slot costs nothing
        holders[e] |= {n}
        free[n] -= 1
        version[e] += 1
        for entry in entries(e):
            heapq.heappush(heap, entry)
    return {d.node: frozenset(e for e in used if d.node in holders[e]) for d in problem.devices}


# --- top-k: successive greedy decomposition, per device a DP over layers ------------------------


def decompose_place(problem: PlacementProblem) -> Placement:
    """The better of two descents: one from empty caches (the paper's order, devices filled one
    after another) and one from the per-expert greedy. From empty alone, devices with one slot
    stall (half a pair saves nothing, and only together can they cover a pair); from the greedy
    alone, the descent keeps the greedy's layout where rebuilding it would be better."""
    by_layer = _pairs_by_layer(problem)
    empty: Placement = {d.node: frozenset() for d in problem.devices}
    results = [_descend(problem, start, by_layer) for start in (empty, greedy_place(problem))]
    return min(results, key=lambda p: pair_latency_s(problem, p))  # on a tie, the first


def _descend(problem: PlacementProblem, start: Placement, by_layer: Mapping[int, Incident]) -> Placement:
    """Take the devices one at a time, each re-solving its own cache with the others' fixed; keep
    a new cache only when it lowers `pair_latency_s`, so the rounds descend and stop."""
    held = dict(start)
    for _ in range(MAX_ROUNDS):
        changed = False
        for d in problem.devices:
            if problem.slots(d.node) == 0:
                continue
            cache = _device_cache(problem, held, d.node, by_layer)
            trial = {**held, d.node: cache}
            now = pair_latency_s(problem, held)
            if cache != held[d.node] and now - pair_latency_s(problem, trial) > REL_TOL * now:
                held, changed = trial, True
        if not changed:
            break
    return held


def _pairs_by_layer(problem: PlacementProblem) -> dict[int, Incident]:
    """Per layer, each expert index's pairs with their tokens, scaled by 1 / C(k, 2)."""
    scale = 1.0 / math.comb(max(problem.top_k, 2), 2)
    layers = set(problem.layers)
    out: dict[int, Incident] = {}
    for home in sorted(problem.activations.pairs):
        for (a, b), c in sorted(problem.activations.pairs[home].items()):
            if a.layer in layers and c > 0:
                incident = out.setdefault(a.layer, {})
                incident.setdefault(a.index, []).append((home, b.index, c * scale))
                incident.setdefault(b.index, []).append((home, a.index, c * scale))
    return out


def _device_cache(problem: PlacementProblem, held: Mapping[NodeId, frozenset[ExpertId]], node: NodeId,
                  by_layer: Mapping[int, Incident]) -> frozenset[ExpertId]:
    """The device's best cache with the others fixed: v_l(s) per layer, then the capacity split
    over layers by (max,+) convolution, F_l(c) = max_s v_l(s) + F_{l-1}(c - s)."""
    slots = problem.slots(node)
    layers = [layer for layer in problem.layers if layer in by_layer]
    best: list[float] = [0.0]
    picks: list[list[int]] = []
    witnesses: list[list[frozenset[int]]] = []
    for layer in layers:
        values, sets = _layer_values(problem, held, node, layer, by_layer[layer], min(slots, problem.num_experts))
        best, pick = max_plus(best, values)
        best, pick = best[:slots + 1], pick[:slots + 1]
        picks.append(pick)
        witnesses.append(sets)
    c = best.index(max(best))  # the fewest slots that reach the best saving
    cache: set[ExpertId] = set()
    for layer, pick, sets in reversed(list(zip(layers, picks, witnesses))):
        s = pick[c]
        cache |= {ExpertId(layer, i) for i in sets[s]}
        c -= s
    return frozenset(cache)


def _layer_values(problem: PlacementProblem, held: Mapping[NodeId, frozenset[ExpertId]], node: NodeId, layer: int,
                  incident: Incident, cap: int) -> tuple[list[float], list[frozenset[int]]]:
    """v(s) for s = 0..cap, the saving of caching s of the layer's experts on `node`, and a set that
    reaches it: the best, over group sizes g, of the set for s - g plus its best group of g
    co-selected experts (`_groups`). Single experts alone would stall where each of a pair saves
    nothing until its partner is cached too."""
    homes = sorted({h for pairs in incident.values() for h, _, _ in pairs})
    base: dict[tuple[NodeId, int], float] = {}  # (home, index) -> access without node caching it
    with_: dict[tuple[NodeId, int], float] = {}  # ... with node caching it
    for i in range(problem.num_experts):
        e = ExpertId(layer, i)
        others = frozenset(n for n, cache in held.items() if e in cache and n != node)
        for h in homes:
            base[h, i] = _access(problem, others, h, e)
            with_[h, i] = _access(problem, others | {node}, h, e)
    # Per co-selected pair (x, y): its own term, which the single gains of x and y each count as if
    # the other stayed uncached, corrected to caching both. Every other term involves one of them.
    fix: dict[tuple[int, int], float] = {}
    for x, pairs in incident.items():
        for h, y, c in pairs:
            fix[x, y] = fix.get((x, y), 0.0) + c * (
                max(with_[h, x], base[h, y]) + max(base[h, x], with_[h, y])
                - max(base[h, x], base[h, y]) - max(with_[h, x], with_[h, y]))

    def gains(cached: frozenset[int]) -> dict[int, float]:
        def now(h: NodeId, j: int) -> float:
            return with_[h, j] if j in cached else base[h, j]
        return {i: sum(c * (max(base[h, i], now(h, j)) - max(with_[h, i], now(h, j))) for h, j, c in pairs)
                for i, pairs in sorted(incident.items()) if i not in cached}

    values: list[float] = [0.0]
    sets: list[frozenset[int]] = [frozenset()]
    partners = {x: frozenset(y for _, y, _ in pairs) for x, pairs in incident.items()}
    groups = [_groups(gains(frozenset()), partners, fix)]
    for s in range(1, cap + 1):
        value, chosen = values[s - 1], sets[s - 1]  # a slot left empty keeps the saving
        for size in range(1, min(s, MAX_GROUP) + 1):
            if size in groups[s - size] and values[s - size] + groups[s - size][size][0] > value:
                gain, members = groups[s - size][size]
                value, chosen = values[s - size] + gain, sets[s - size] | members
        values.append(value)
        sets.append(chosen)
        groups.append(_groups(gains(chosen), partners, fix))
    return values, sets


def _groups(single: Mapping[int, float], partners: Mapping[int, frozenset[int]],
            fix: Mapping[tuple[int, int], float]) -> dict[int, tuple[float, frozenset[int]]]:
    """Per size 1..MAX_GROUP, the uncached group of largest joint gain found by growing from each
    uncached expert, one co-selected expert at a time, the one that adds most. A group's gain is its
    members' single gains plus the pair corrections among them (a term spans at most two experts)."""
    best: dict[int, tuple[float, frozenset[int]]] = {}
    for x in sorted(single):
        members, gain = [x], single[x]
        frontier = {y for y in partners[x] if y in single}
        while True:
            if len(members) not in best or gain > best[len(members)][0]:
                best[len(members)] = (gain, frozenset(members))
            if len(members) == MAX_GROUP or not frontier:
                break
            added = {y: single[y] + sum(fix.get((m, y), 0.0) for m in members) for y in sorted(frontier)}
            y = max(added, key=lambda o: added[o])
            members.append(y)
            gain += added[y]
            frontier = (frontier | {z for z in partners[y] if z in single}) - set(members)
    return best
