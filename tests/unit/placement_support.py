"""Small placement instances and their exact optima, found by enumerating every placement: the
yardstick the policies' tests hold them to."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence

from protos.ids import ExpertId, NodeId
from scheduler.placement.problem import Activations, Device, Placement, PlacementProblem

EXPERT_BYTES = 1_000_000
TOKEN_BYTES = 2_048


def device(name: str, slots: int, disk: float = 50e6, link: float = 62.5e6, latency: float = 0.001,
           flops: float = 20e9) -> Device:
    """A device whose memory holds `slots` experts; 500 Mbit/s, 1 ms, 50 MB/s disk by default."""
    return Device(NodeId(name), slots * EXPERT_BYTES, disk, link, latency, flops)


def skewed_activations(homes: Sequence[str], layers: Sequence[int], num_experts: int, top_k: int, tokens: int,
                       seed: int) -> Activations:
    """Each home routes `tokens` tokens per layer, top_k distinct experts each, from its own skewed
    preference over the layer's experts (a random Zipf-like order per home and layer), with the
    co-selected pairs counted."""
    rng = random.Random(seed)
    counts: dict[NodeId, dict[ExpertId, float]] = {}
    pairs: dict[NodeId, dict[tuple[ExpertId, ExpertId], float]] = {}
    for home in homes:
        own, both = counts.setdefault(NodeId(home), {}), pairs.setdefault(NodeId(home), {})
        for layer in layers:
            order = list(range(num_experts))
            rng.shuffle(order)
            weight = {e: 1.0 / (rank + 1) ** 1.2 for rank, e in enumerate(order)}
            for _ in range(tokens):
                chosen: list[int] = []
                while len(chosen) < top_k:
                    e = rng.choices(order, [weight[x] for x in order])[0]
                    if e not in chosen:
                        chosen.append(e)
                for e in chosen:
                    key = ExpertId(layer, e)
                    own[key] = own.get(key, 0.0) + 1
                for a, b in itertools.combinations(sorted(chosen), 2):
                    pair = (ExpertId(layer, a), ExpertId(layer, b))
                    both[pair] = both.get(pair, 0.0) + 1
    return Activations(counts, pairs)


def problem(devices: Sequence[Device], layers: Sequence[int] = (0,), num_experts: int = 4, top_k: int = 1,
            tokens: int = 200, seed: int = 0) -> PlacementProblem:
    """An instance with one home per device, each with its own skewed workload."""
    acts = skewed_activations([d.node for d in devices], layers, num_experts, top_k, tokens, seed)
    return PlacementProblem(tuple(devices), tuple(layers), num_experts, top_k, EXPERT_BYTES, TOKEN_BYTES,
                            flops_per_token=2 * 3 * 512 * 768, activations=acts)


def placements(problem: PlacementProblem) -> Iterator[Placement]:
    """Every placement the devices' memories allow (each device any subset of at most its slots)."""
    experts = problem.experts()
    options = []
    for d in problem.devices:
        slots = min(problem.slots(d.node), len(experts))
        options.append([frozenset(c) for k in range(slots + 1) for c in itertools.combinations(experts, k)])
    for choice in itertools.product(*options):
        yield {d.node: held for d, held in zip(problem.devices, choice)}


def optimum(problem: PlacementProblem, cost: Callable[[PlacementProblem, Placement], float],
            feasible: Callable[[Placement], bool] = lambda p: True) -> tuple[float, Placement]:
    """The least cost over every feasible placement, and one placement that has it."""
    best: tuple[float, Placement] | None = None
    for p in placements(problem):
        if feasible(p):
            c = cost(problem, p)
            if best is None or c < best[0]:
                best = (c, p)
    if best is None:
        raise ValueError("no feasible placement")
    return best
