"""Replicate-popular placement: hold every expert once, then spend the spare memory on copies of the hot ones.

The usual first answer to skewed routing, and a baseline the placement papers measure against: FasterMoE's
shadowing of hot experts, Lina's replication of popular experts at inference and DeepSeek-V3's redundant experts
all copy what is chosen most. It uses only how often each expert is chosen over the whole window, summed over every
home, not which home chose it.

1. Cover: experts by popularity, most popular first, each to the device with the most free slots (ties to the
   earlier device), until the experts or the pooled slots run out; with too few slots the least popular are left
   out.
2. Replicate: every device fills its remaining slots with the most popular experts it does not hold yet.

Popularity ties go to the lower ExpertId, so the result is a function of the problem alone.
"""

from __future__ import annotations

from protos.ids import ExpertId, NodeId
from scheduler.placement.problem import Placement, PlacementProblem


def place(problem: PlacementProblem) -> Placement:
    ranked = _popularity_order(problem)
    held: dict[NodeId, set[ExpertId]] = {d.node: set() for d in problem.devices}
    free = {d.node: problem.slots(d.node) for d in problem.devices}
    for expert in ranked:
        # max() keeps the first of equals, and `free` is in device order
        node = max(free, key=lambda n: free[n])
        if free[node] == 0:
            break
        held[node].add(expert)
        free[node] -= 1
    for node, own in held.items():
        for expert in ranked:
            if free[node] == 0:
                break
            if expert not in own:
                own.add(expert)
                free[node] -= 1
    return {n: frozenset(h) for n, h in held.items()}


def _popularity_order(problem: PlacementProblem) -> list[ExpertId]:
    """Every expert of the model, by (token, expert) selections summed over all homes, most first."""
    acts = problem.activations
    total = {e: sum(acts.count(home, e) for home in acts.homes()) for e in problem.experts()}
    return sorted(total, key=lambda e: (-total[e], e))
