"""Token routing for one MoE layer: which agent runs each expert on whose tokens (pure)."""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.types import LayerReport, NodeId, RoutingPlan


def resident_first(layer: int, reports: Sequence[LayerReport]) -> RoutingPlan:
    """Run each expert on one agent: where it is resident (or already loading), else on the agent
    that owns most of its tokens, so a miss is loaded once, where the fewest bytes must move.

    Among several holders the one owning most of the expert's tokens wins; ties go to the agent
    listed first. All owners' tokens of the expert go to that executor.
    """
    executor: dict[tuple[NodeId, int], NodeId] = {}
    if not reports or not reports[0].counts:
        return RoutingPlan.whole(layer, executor)
    for expert in range(len(reports[0].counts)):
        owners = [r for r in reports if r.counts[expert] > 0]
        if not owners:
            continue
        holders = [r for r in reports if expert in r.resident or expert in r.loading]
        pool = holders or owners
        chosen = max(pool, key=lambda r: (r.counts[expert], -reports.index(r))).node
        for r in owners:
            executor[(r.node, expert)] = chosen
    return RoutingPlan.whole(layer, executor)
