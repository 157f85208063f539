"""Adaptive token scheduling: after a layer's router, decide expert by expert which agent runs it
on which tokens so that the layer finishes soonest under the cost model (pure).

Greedy in the manner of longest-processing-time-first: experts in decreasing token count; each
goes where the layer's makespan (the busiest agent's finish time) grows least, counting a disk
read where the expert is neither resident nor already in flight, its compute, and the hidden
states that must cross links (the owner sends its tokens, the executor sends results back). An
owner holding the expert runs its own tokens (agents start those before the plan comes); the
other owners' tokens of an expert held by several agents are split among them, owner by owner.
Loading into a full buffer evicts an expert that a later request will probably read back, so it
is charged a second read: without that, a layer-by-layer makespan happily copies a busy agent's
expert to an idle one and the pooled cache churns from request to request. Experts the owners
already sent ahead by direct routes (`Policy.direct_routes`) stay where they went and are charged
first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from scheduler.cost_model import AgentProfile, AgentTime, CostModel
from scheduler.types import LayerReport, NodeId, RoutingPlan, Share


def schedule_layer(
    layer: int, reports: Sequence[LayerReport], profiles: Mapping[NodeId, AgentProfile], cost: CostModel,
    fixed: Mapping[int, NodeId] | None = None,
) -> RoutingPlan:
    """fixed: experts whose tokens the owners already sent to one executor (direct routes); the
    plan keeps them there and schedules the other experts around that work."""
    if not reports or not reports[0].counts:
        return RoutingPlan(layer, {})
    fixed = fixed or {}
    nodes = [r.node for r in reports]
    counts = {r.node: r.counts for r in reports}
    held = {r.node: r.resident | r.loading for r in reports}
    free = {r.node: profiles[r.node].free_slots(r.resident_total) for r in reports}
    time = {n: AgentTime() for n in nodes}
    shares: dict[tuple[NodeId, int], list[Share]] = {}
    by_tokens = sorted(range(len(reports[0].counts)), key=lambda e: -sum(counts[n][e] for n in nodes))
    for e in (e for e in by_tokens if e in fixed):  # committed work first
        tokens = {o: counts[o][e] for o in nodes if counts[o][e] > 0}
        _place(time, profiles, cost, free, shares, fixed[e], e, tokens, e not in held[fixed[e]])
    for e in (e for e in by_tokens if e not in fixed):
        owners = [n for n in nodes if counts[n][e] > 0]
        if not owners:
            continue
        holders = [n for n in nodes if e in held[n]]
        # An owner that holds the expert runs its own tokens: agents start them as soon as their
        # router has run, before this plan exists, and they cross no link.
        for owner in (o for o in owners if o in holders):
            _charge(time, profiles, cost, owner, {owner: counts[owner][e]}, False)
            shares[(owner, e)] = [(owner, 0)]
        rest = [o for o in owners if o not in holders]
        if not rest:
            continue
        if len(holders) > 1:
            for owner in sorted(rest, key=lambda n: -counts[n][e]):
                executor = min(holders, key=lambda x: _score(time, profiles, cost, x, {owner: counts[owner][e]}, False, free))
                _charge(time, profiles, cost, executor, {owner: counts[owner][e]}, False)
                shares[(owner, e)] = [(executor, 0)]
            continue
        tokens = {o: counts[o][e] for o in rest}
        executor = min(nodes, key=lambda x: _score(time, profiles, cost, x, tokens, e not in held[x], free))
        _place(time, profiles, cost, free, shares, executor, e, tokens, e not in held[executor])
    return RoutingPlan(layer, {k: tuple(v) for k, v in shares.items()})


def _place(time: dict[NodeId, AgentTime], profiles: Mapping[NodeId, AgentProfile], cost: CostModel,
           free: dict[NodeId, int | None], shares: dict[tuple[NodeId, int], list[Share]], executor: NodeId,
           expert: int, tokens: Mapping[NodeId, int], load: bool) -> None:
    """All of these owners' tokens of `expert` on `executor`, which reads it first if `load`."""
    _charge(time, profiles, cost, executor, tokens, load, _evicts(load, free[executor]))
    if load and free[executor] is not None:
        free[executor] -= 1  # type: ignore[operator]
    for owner in tokens:
        shares[(owner, expert)] = [(executor, 0)]


def _evicts(load: bool, free: int | None) -> bool:
    return load and free is not None and free <= 0


def _charge(time: dict[NodeId, AgentTime], profiles: Mapping[NodeId, AgentProfile], cost: CostModel, executor: NodeId,
            tokens: Mapping[NodeId, int], load: bool, evicts: bool = False) -> None:
    p = profiles[executor]
    t = time[executor]
    t.disk_s += cost.load_s(p) * ((2 if evicts else 1) if load else 0)
    t.compute_s += cost.compute_s(p, sum(tokens.values()))
    remote = sum(n for o, n in tokens.items() if o != executor)
    t.link_s += cost.send_s(p, remote)  # results back to the owners
    for owner, n in tokens.items():
        if owner != executor:
            time[owner].link_s += cost.send_s(profiles[owner], n)  # hidden states out


def _score(time: dict[NodeId, AgentTime], profiles: Mapping[NodeId, AgentProfile], cost: CostModel, executor: NodeId,
           tokens: Mapping[NodeId, int], load: bool, free: Mapping[NodeId, int | None]) -> tuple[float, int, float, float]:
    """(makespan if the tokens run on executor, eviction flag, executor's compute, link time):
    lower is better."""
    trial = {n: AgentTime(t.disk_s, t.compute_s, t.link_s) for n, t in time.items()}
    evicts = _evicts(load, free[executor])
    _charge(trial, profiles, cost, executor, tokens, load, evicts)
    makespan = max(t.finish_s for t in trial.values())
    moved = sum(t.link_s for t in trial.values())
    # Round the makespan so near-ties fall to no eviction, then to the executor with the least
    # compute (when reads set the makespan, this still spreads the tokens: the experts placed
    # by a cold request are where later, warm requests will run them), then to fewer bytes moved.
    return round(makespan, 6), int(evicts), round(trial[executor].compute_s, 6), moved
