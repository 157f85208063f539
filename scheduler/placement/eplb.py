"""EPLB: DeepSeek's expert-parallel load balancer, made to fit unlike devices' memories.

DeepSeek-V3 serves with redundant experts: copies of the heavily loaded ones, packed so that each GPU carries about
the same load (github.com/deepseek-ai/EPLB; vLLM ports it as `distributed/eplb/rebalance_algo.py`). This is its
global policy, written from that description, one MoE layer at a time:

    load[e]          (token, expert) selections of expert e summed over every home
    caps[d]          device d's slots for this layer (_layer_slots)
    replicas[e]      step 1: one each, then every spare slot to the highest load[e] / replicas[e]
    packing          step 2: replicas by load[e] / replicas[e], heaviest first, each to the device that would carry
                     the least load per slot with it, among those with a free slot that do not hold the expert yet

Where it departs from the original, because potluck's devices differ and a placement is a set:
- Packing compares the load per slot a device would have after taking the replica, not before: on like devices
  that picks the same device as the original, and on unlike ones it is the greedy for machines of different speeds
  (the original rule, ties to the first device, sends the heaviest replica to a small device; on small instances
  with slots 1:1:2 that cost up to 1.5x the best max load).
- The original gives every GPU the same number of slots in every layer; here each device's own slots are split
  evenly over the layers, so a layer's devices differ in slots. With fewer slots than experts in a layer, its least
  loaded experts get no replica (they are read from disk on demand).
- A device holds an expert at most once, so a copy count the devices cannot seat is skipped in step 1 (the
  Gale-Ryser test in _fits) and, when the greedy packing corners itself, an augmenting path moves earlier replicas
  to make room (_make_room). The original does not stop a GPU taking two copies of one expert; here that would
  waste a slot.
"""

from __future__ import annotations

from protos.ids import ExpertId, NodeId
from scheduler.placement.problem import Placement, PlacementProblem


def place(problem: PlacementProblem) -> Placement:
    nodes = [d.node for d in problem.devices]
    loads = _expert_loads(problem)
    held: dict[NodeId, set[ExpertId]] = {n: set() for n in nodes}
    for layer, caps in zip(problem.layers, _layer_slots(problem)):
        load = [loads[ExpertId(layer, e)] for e in range(problem.num_experts)]
        for node, experts in zip(nodes, _pack(load, _replicate(load, caps), caps)):
            held[node].update(ExpertId(layer, e) for e in experts)
    return {n: frozenset(h) for n, h in held.items()}


def device_loads(problem: PlacementProblem, placement: Placement) -> dict[NodeId, float]:
    """Per device, the load it serves per slot: each expert's load shared evenly among the devices holding it,
    summed over what the device holds, divided by its slots (0 for a device without slots). The max of these is
    what EPLB minimises: the busiest device sets the pace of every MoE layer."""
    loads = _expert_loads(problem)
    copies: dict[ExpertId, int] = {}
    for experts in placement.values():
        for e in experts:
            copies[e] = copies.get(e, 0) + 1
    result: dict[NodeId, float] = {}
    for d in problem.devices:
        slots = problem.slots(d.node)
        served = sum(loads.get(e, 0.0) / copies[e] for e in placement.get(d.node, frozenset()))
        result[d.node] = served / slots if slots else 0.0
    return result


def _expert_loads(problem: PlacementProblem) -> dict[ExpertId, float]:
    acts = problem.activations
    return {e: sum(acts.count(home, e) for home in acts.homes()) for e in problem.experts()}


def _layer_slots(problem: PlacementProblem) -> list[list[int]]:
    """[layer][device] slots: each device's slots split evenly over the layers. Its remainder goes to the layers
    after the previous device's remainder, wrapping, so that the layers' totals differ by at most 1 (remainders all
    on the first layers would starve the last ones). No more than num_experts per layer, since a device holds an
    expert once; the slots beyond that stay empty."""
    num_layers, n = len(problem.layers), problem.num_experts
    caps = [[0] * len(problem.devices) for _ in range(num_layers)]
    start = 0
    for d, device in enumerate(problem.devices):
        each, extra = divmod(problem.slots(device.node), num_layers)
        for i in range(num_layers):
            caps[i][d] = each
        for j in range(extra):
            caps[(start + j) % num_layers][d] += 1
        start = (start + extra) % num_layers
    return [[min(c, n) for c in row] for row in caps]


def _replicate(load: list[float], caps: list[int]) -> list[int]:
    """Step 1: replicas per expert, summing to the layer's slots; with fewer slots than experts the least loaded
    (ties: the higher index) get none."""
    n, slots = len(load), sum(caps)
    replicas = [0] * n
    for e in sorted(range(n), key=lambda e: (-load[e], e))[:slots]:
        replicas[e] = 1
    for _ in range(slots - min(slots, n)):
        # every expert has a replica here, since slots > n; one more copy of an expert can always be seated
        # (see _fits), so the loop finds one
        for e in sorted(range(n), key=lambda e: (-load[e] / replicas[e], e)):
            replicas[e] += 1
            if _fits(replicas, caps):
                break
            replicas[e] -= 1
    return replicas


def _fits(replicas: list[int], caps: list[int]) -> bool:
    """Whether devices with `caps` slots can hold `replicas[e]` copies of each expert, each device an expert at
    most once (Gale-Ryser): the k most replicated experts need sum(replicas) <= sum over devices of min(cap, k),
    for every k. Adding a copy to a least-replicated expert keeps this true while slots are left, which is why
    step 1 never runs out of candidates."""
    need = 0
    for k, r in enumerate(sorted(replicas, reverse=True), 1):
        need += r
        if need > sum(min(c, k) for c in caps):
            return False
    return True


def _pack(load: list[float], replicas: list[int], caps: list[int]) -> list[set[int]]:
    """Step 2: per device, the expert indices it holds for this layer."""
    share = [load[e] / r if r else 0.0 for e, r in enumerate(replicas)]  # load each replica carries
    held: list[set[int]] = [set() for _ in caps]
    for e in sorted((e for e, r in enumerate(replicas) for _ in range(r)), key=lambda e: (-share[e], e)):
        open_ = [d for d, cap in enumerate(caps) if len(held[d]) < cap and e not in held[d]]
        if open_:
            best = min(open_, key=lambda d: ((sum(share[x] for x in held[d]) + share[e]) / caps[d], d))
            held[best].add(e)
        else:
            _make_room(e, held, caps)
    return held


def _make_room(expert: int, held: list[set[int]], caps: list[int]) -> None:
    """Seat one more copy of `expert` when every device with a free slot holds it already: breadth-first search for
    a chain expert -> device d1, whose expert y1 moves to d2, whose y2 moves on ... to a device with a free slot
    (an augmenting path of the bipartite b-matching). Replica counts that pass _fits always leave one."""
    arrives: dict[int, int] = {}  # device -> the expert that moves onto it
    leaves: dict[int, int] = {}  # expert -> the device it moves off
    frontier, seen = [expert], {expert}
    while frontier:
        following: list[int] = []
        for x in frontier:
            for d, cap in enumerate(caps):
                if d in arrives or x in held[d] or cap == 0:
                    continue
                arrives[d] = x
                if len(held[d]) < cap:
                    while True:
                        moved = arrives[d]
                        held[d].add(moved)
                        if moved == expert:
                            return
                        d = leaves[moved]
                        held[d].remove(moved)
                for y in sorted(held[d] - seen):
                    seen.add(y)
                    leaves[y] = d
                    following.append(y)
        frontier = following
    raise AssertionError(f"no room for expert {expert} although its replica counts passed _fits")
