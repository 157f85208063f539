"""Uniform placement: static expert parallelism, blind to the activation statistics.

The baseline every expert-parallel server starts from (DeepSpeed-MoE, vLLM and SGLang's `--enable-expert-parallel`):
each routed expert of each MoE layer lives on exactly one device, the experts dealt out in proportion to what each
device holds. Here the devices are unlike, so "in proportion" means slots (`problem.slots`), and it holds per layer
as well as in total: device d keeps kept[l] * slots[d] / pooled of layer l's experts, rounded down or up, never a
whole layer on one device.

- Pooled slots fewer than experts: each layer keeps an even share (the first `total % L` layers one more) and leaves
  out its highest indices; every slot is filled.
- Pooled slots more than experts: every expert once, the spare slots stay empty (the runtime cache uses them).

Within a layer a device takes a contiguous run of indices, devices in problem order, as static EP ranks do.
"""

from __future__ import annotations

from protos.ids import ExpertId, NodeId
from scheduler.placement.problem import Placement, PlacementProblem


def place(problem: PlacementProblem) -> Placement:
    nodes = [d.node for d in problem.devices]
    slots = [problem.slots(n) for n in nodes]
    total = min(sum(slots), len(problem.layers) * problem.num_experts)
    held: dict[NodeId, set[ExpertId]] = {n: set() for n in nodes}
    if total > 0:
        for layer, row in zip(problem.layers, _counts(total, len(problem.layers), slots)):
            start = 0
            for node, count in zip(nodes, row):
                held[node].update(ExpertId(layer, start + i) for i in range(count))
                start += count
    return {n: frozenset(h) for n, h in held.items()}


def _counts(total: int, num_layers: int, slots: list[int]) -> list[list[int]]:
    """[layer][device] experts to place: `total` in all, layer l keeping kept[l] (as even as integers allow), and
    entry (l, d) the floor or the ceiling of kept[l] * slots[d] / pooled, with no device over its slots.

    Rounding a matrix so that rows, columns and entries all round well is a flow problem in general; this one is
    rank one (kept[l] * slots[d]) with at most two distinct rows (q + 1 for the first `rho` layers, q after), which
    makes it easy: each block of identical rows spreads its extra units (the ceilings) round-robin over its rows."""
    pooled = sum(slots)
    q, rho = divmod(total, num_layers)
    blocks = [(rho, q + 1), (num_layers - rho, q)] if rho else [(num_layers, q)]
    # per block: the floors, and the fractional parts as numerators over `pooled`
    floors = [[kept * s // pooled for s in slots] for _, kept in blocks]
    fracs = [[kept * s % pooled for s in slots] for _, kept in blocks]
    rows, kept = blocks[0]
    extra = [_apportion(rows * (kept - sum(floors[0])), fracs[0])]  # per device, ceilings over block 0's rows
    if len(blocks) == 2:
        # two blocks only when total % L != 0, hence total == pooled (total == L * num_experts otherwise): every
        # device ends exactly full, so block 1's extras are what block 0 left. Each lies strictly within 1 of its
        # fractional target, so it is the floor or the ceiling of it, and never more than block 1's rows.
        rest = blocks[1][0]
        extra.append([s - rows * f0 - rest * f1 - e0 for s, f0, f1, e0 in zip(slots, floors[0], floors[1], extra[0])])
    counts: list[list[int]] = []
    for (rows, _), base, ext in zip(blocks, floors, extra):
        for ones in _round_robin(rows, ext):
            counts.append([b + o for b, o in zip(base, ones)])
    return counts


def _apportion(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights` by largest remainders (ties to the earlier index)."""
    whole = sum(weights)
    if whole == 0:
        return [0] * len(weights)
    shares = [total * w // whole for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _round_robin(rows: int, ones: list[int]) -> list[list[int]]:
    """A 0/1 [rows][columns] grid with ones[c] ones in column c, every row the same count (sum(ones) must divide
    by rows). Column c's ones go to consecutive rows, wrapping, so no column takes a row twice while
    ones[c] <= rows."""
    grid = [[0] * len(ones) for _ in range(rows)]
    at = 0
    for col, count in enumerate(ones):
        for _ in range(count):
            grid[at % rows][col] = 1
            at += 1
    return grid
