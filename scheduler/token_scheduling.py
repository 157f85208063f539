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

An expert no agent holds must be read wherever it runs. With a split mode other than `never`, it
may run in slices over several agents instead, each reading and computing 1/m of it for every
owner's tokens, the agents chosen by the load balance (`balance.py`, the function decode's tables
come from) given the layer's work so far. `always` splits every such expert. `auto` first
schedules every expert whole, as above, then splits one of the busiest agent's unheld experts
while that ends the layer sooner by more than a split's own cost (`SPLIT_CALL_S`, or a round
trip where the link's latency is longer): with as many unheld experts as agents or more, whole
reads keep every disk busy and a split only adds link traffic (chosen expert by expert, a split
always looks better than one more whole read, and every expert of a cold layer would be split);
with fewer, or one agent's reads left over, splitting is what keeps the other disks working.
Held experts are not split: their owners run them before the plan comes (above), and the
prefetch reads the predicted ones whole (`Policy.prefetches`), so a split serves a layer's
experts that nobody predicted, and short prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from protos.ids import ExpertId
from scheduler.balance import Agent, Need, SplitMode, balance
from scheduler.cost_model import AgentProfile, AgentTime, CostModel
from scheduler.types import LayerReport, NodeId, RoutingPlan, Share

# What a split costs the owners beyond the model where no link latency is emulated: a call to
# every agent of the split and the sum of their partial outputs. A holder's one-token decode
# batch on loopback took 1.5 ms a call on this project's host (docs/decode.md).
SPLIT_CALL_S = 0.002


def schedule_layer(
    layer: int, reports: Sequence[LayerReport], profiles: Mapping[NodeId, AgentProfile], cost: CostModel,
    fixed: Mapping[int, NodeId] | None = None, split: SplitMode = "never",
    latency_s: Mapping[NodeId, float] | None = None,
) -> RoutingPlan:
    """fixed: experts whose tokens the owners already sent to one executor (direct routes); the
    plan keeps them there and schedules the other experts around that work. split: whether an
    expert no agent holds may run in slices (`never`, `auto`, `always`); latency_s: each agent's
    one-way link latency, for what a split's calls cost."""
    if not reports or not reports[0].counts:
        return RoutingPlan(layer, {})
    fixed = fixed or {}
    nodes = [r.node for r in reports]
    counts = {r.node: r.counts for r in reports}
    held = {r.node: r.resident | r.loading for r in reports}
    free = {r.node: profiles[r.node].free_slots(r.resident_total) for r in reports}
    time = {n: AgentTime() for n in nodes}
    shares: dict[tuple[NodeId, int], list[Share]] = {}
    splits: dict[int, tuple[NodeId, ...]] = {}
    unheld: dict[int, Unheld] = {}  # run whole, but no agent held it: may split
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
        if not holders and split == "always" and len(nodes) > 1:
            splits[e] = _split_over(ExpertId(layer, e), time, profiles, cost, tokens, latency_s or {})
            _add(time, _split_cost(profiles, cost, splits[e], tokens, free))
            continue
        executor = min(nodes, key=lambda x: _score(time, profiles, cost, x, tokens, e not in held[x], free))
        if not holders:
            unheld[e] = (tokens, executor, _deltas(profiles, cost, executor, tokens, True, _evicts(True, free[executor])))
        _place(time, profiles, cost, free, shares, executor, e, tokens, e not in held[executor])
    if split == "auto" and len(nodes) > 1:
        for e, over in _split_busiest(layer, time, profiles, cost, unheld, free, latency_s or {}):
            splits[e] = over
            for owner in unheld[e][0]:
                del shares[(owner, e)]
    return RoutingPlan(layer, {k: tuple(v) for k, v in shares.items()}, splits)


Deltas = dict[NodeId, AgentTime]  # seconds a run adds to each agent's disk, compute and link
Unheld = tuple[dict[NodeId, int], NodeId, Deltas]  # an unheld expert run whole: owners' tokens, executor, what it adds


def _split_busiest(layer: int, time: dict[NodeId, AgentTime], profiles: Mapping[NodeId, AgentProfile],
                   cost: CostModel, unheld: Mapping[int, Unheld],
                   free: Mapping[NodeId, int | None], latency_s: Mapping[NodeId, float]) -> list[tuple[int, tuple[NodeId, ...]]]:
    """`auto`'s splits, after every expert was scheduled whole: while the busiest agent has an
    unheld expert whose split (over the agents the balance picks, given everything else) ends
    the layer sooner, or leaves fewer agents ending last (two agents each reading one expert
    while two idle: split one, then the other), and spares the busiest agent more than a
    split's cost, the best such split is made. Updates `time`; returns (expert, agents) in the
    order chosen."""
    out: list[tuple[int, tuple[NodeId, ...]]] = []
    left = dict(unheld)
    overhead = max([SPLIT_CALL_S, *(2 * v for v in latency_s.values())])

    def ends() -> tuple[float, ...]:  # every agent's finish, latest first (compared in order)
        return tuple(sorted((round(t.finish_s, 6) for t in time.values()), reverse=True))

    while left:
        busiest = max(sorted(time), key=lambda n: time[n].finish_s)
        now, was = ends(), time[busiest].finish_s
        best: tuple[tuple[float, ...], int, tuple[NodeId, ...], Deltas] | None = None
        # Each trial is undone by restoring these, not by subtracting: the float residue of adding
        # and taking back decided near-ties between agents by accident.
        saved = {n: (t.disk_s, t.compute_s, t.link_s) for n, t in time.items()}
        for e, (tokens, executor, whole) in sorted(left.items()):
            # Only an expert the busiest agent runs can spare it anything: one it only sends
            # tokens to would send them to every agent of the split instead (and every unheld
            # expert of a long prompt has tokens from every owner).
            if executor != busiest:
                continue
            _add(time, whole, -1)
            over = _split_over(ExpertId(layer, e), time, profiles, cost, tokens, latency_s)
            parts = _split_cost(profiles, cost, over, tokens, free)
            _add(time, parts)
            trial, spared = ends(), was - time[busiest].finish_s
            for n, (disk, compute, link) in saved.items():
                time[n].disk_s, time[n].compute_s, time[n].link_s = disk, compute, link
            if trial < now and spared > overhead and (best is None or trial < best[0]):
                best = (trial, e, over, parts)
        if best is None:
            return out
        _, e, over, parts = best
        _add(time, left.pop(e)[2], -1)
        _add(time, parts)
        out.append((e, over))
    return out


def _split_over(expert: ExpertId, time: Mapping[NodeId, AgentTime], profiles: Mapping[NodeId, AgentProfile],
                cost: CostModel, tokens: Mapping[NodeId, int], latency_s: Mapping[NodeId, float]) -> tuple[NodeId, ...]:
    """The agents the load balance splits an unheld expert over (slice i on the i-th), given the
    layer's work so far. It charges links as for one owner (the one with the most of the tokens)
    sending them to each other agent; `_split_cost` then counts every owner's."""
    owner = max(sorted(tokens), key=lambda o: tokens[o])
    agents = [Agent(profiles[n], latency_s.get(n, 0.0), time[n]) for n in sorted(time)]
    return balance(agents, owner, cost, [Need(expert, sum(tokens.values()))], "always")[0].nodes


def _split_cost(profiles: Mapping[NodeId, AgentProfile], cost: CostModel, over: tuple[NodeId, ...],
                tokens: Mapping[NodeId, int], free: Mapping[NodeId, int | None]) -> Deltas:
    """Slice i of an unheld expert on over[i]: each reads (twice where its memory is full, as a
    whole read is charged) and computes 1/m of it for every owner's tokens, which reach it and
    go back as partial outputs."""
    total, m = sum(tokens.values()), len(over)
    out: Deltas = {}
    for node in over:
        p, t = profiles[node], out.setdefault(node, AgentTime())
        t.disk_s += cost.load_s(p) * (2 if _evicts(True, free[node]) else 1) / m
        t.compute_s += cost.compute_s(p, total) / m
        t.link_s += cost.send_s(p, total - tokens.get(node, 0))  # partial outputs back to the owners
        for owner, n in tokens.items():
            if owner != node:
                out.setdefault(owner, AgentTime()).link_s += cost.send_s(profiles[owner], n)  # hidden states out
    return out


def _add(time: dict[NodeId, AgentTime], deltas: Deltas, sign: int = 1) -> None:
    for node, d in deltas.items():
        t = time[node]
        t.disk_s += sign * d.disk_s
        t.compute_s += sign * d.compute_s
        t.link_s += sign * d.link_s


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
    _add(time, _deltas(profiles, cost, executor, tokens, load, evicts))


def _deltas(profiles: Mapping[NodeId, AgentProfile], cost: CostModel, executor: NodeId, tokens: Mapping[NodeId, int],
            load: bool, evicts: bool = False) -> Deltas:
    """What these owners' tokens of one expert whole on `executor` add to each agent: its read
    (twice where it evicts) and compute, and the hidden states there and back."""
    p = profiles[executor]
    out: Deltas = {executor: AgentTime()}
    t = out[executor]
    t.disk_s += cost.load_s(p) * ((2 if evicts else 1) if load else 0)
    t.compute_s += cost.compute_s(p, sum(tokens.values()))
    remote = sum(n for o, n in tokens.items() if o != executor)
    t.link_s += cost.send_s(p, remote)  # results back to the owners
    for owner, n in tokens.items():
        if owner != executor:
            out.setdefault(owner, AgentTime()).link_s += cost.send_s(profiles[owner], n)  # hidden states out
    return out


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
