"""Which experts to read into the agents' free memory between requests: a pure function.

Pooled memory that holds nothing is wasted while some experts are on no agent at all, and every
such expert is a disk read some later request waits for. A prefill, for one, runs the last layer
for its final token only, so it never reads most of that layer's experts, which every decoded
token then needs. After a request the scheduler gives each expert that no agent holds (or is
reading) to an agent with free room; the agents read them at their disks' lowest priority, never
evicting a whole expert (`node_agent/expert_buffer.py`). Where the pooled memory holds every
expert once, one that finds no free room takes the room of a second copy (`plan_swaps`).

    AgentHoldings (from the agents' cache reports) -> plan_fill -> {agent: experts to read}
                                                   -> plan_swaps -> {agent: (reads, copies to give up)}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from protos.ids import ExpertId
from scheduler.types import NodeId


@dataclass(frozen=True)
class AgentHoldings:
    node: NodeId
    held: frozenset[ExpertId]  # resident or being read
    free_slots: int | None  # experts that still fit in its expert memory (None: unlimited)
    disk_bytes_per_s: float  # its read bandwidth (0: unlimited)
    placed: frozenset[ExpertId] = frozenset()  # the placement it keeps: never given up


def holds_every(slots: Iterable[int | None], experts: int) -> bool:
    """Whether agents whose memory takes these many experts each (None: unlimited) can hold
    `experts` at once: then the fills and swaps keep each on one agent, and the decode prefetch
    has nothing to move (`decode_plan.prompt_cache`)."""
    slots = list(slots)
    return any(n is None for n in slots) or sum(n or 0 for n in slots) >= experts


def plan_fill(agents: Sequence[AgentHoldings], experts: Sequence[ExpertId], expert_bytes: int,
              owner: Callable[[ExpertId], NodeId] | None = None) -> dict[NodeId, tuple[ExpertId, ...]]:
    """Give every expert of `experts` that no agent holds to the agent with room that would have
    it read soonest (its queue of fills over its disk rate), preferring the one holding fewest
    experts of that layer, so that a layer's work can spread. With `owner`, an expert may only go
    to its owner (static expert parallelism: no other agent would run it). Experts are taken in
    the order given, which is the order each agent reads them; those that find no room are left
    out. Returns the experts per agent; agents given none are absent."""
    held = frozenset().union(*(a.held for a in agents))
    free: dict[NodeId, float] = {a.node: float("inf") if a.free_slots is None else a.free_slots for a in agents}
    per_layer = {a.node: _count_layers(a.held) for a in agents}
    queued: dict[NodeId, list[ExpertId]] = {a.node: [] for a in agents}

    def read_at(a: AgentHoldings) -> float:
        """Seconds until a new fill on `a` would be read (0 on an unlimited disk)."""
        return len(queued[a.node]) * expert_bytes / a.disk_bytes_per_s if a.disk_bytes_per_s else 0.0

    for eid in experts:
        room = [a for a in agents if free[a.node] > 0 and (owner is None or a.node == owner(eid))]
        if eid in held or not room:
            continue
        best = min(room, key=lambda a: (read_at(a), per_layer[a.node].get(eid.layer, 0), len(queued[a.node]), a.node))
        queued[best.node].append(eid)
        per_layer[best.node][eid.layer] = per_layer[best.node].get(eid.layer, 0) + 1
        free[best.node] -= 1
    return {n: tuple(es) for n, es in queued.items() if es}


def plan_swaps(agents: Sequence[AgentHoldings], experts: Sequence[ExpertId], filled: Mapping[NodeId, Sequence[ExpertId]]
               ) -> dict[NodeId, tuple[tuple[ExpertId, ...], tuple[ExpertId, ...]]]:
    """For a pool whose memory holds every expert of `experts` once: each expert that no agent
    holds nor is to read (`filled`, the fills planned) is read in place of a second copy, one an
    agent holds and another agent holds too, outside its placement. Left alone, such a pool
    keeps an expert on no agent for every second copy, and whoever needs one reads it from disk
    at every use, evicting another that then goes missing (on the 4-agent LAN case, with a home
    that read experts on demand during its first request, 6-11 reads a 64-token stream). The
    copy given up is of the layer the agent holds most of, so that a layer's work spreads; the
    expert goes to the agent with the fewest reads queued. Returns per agent (experts to read,
    copies to give up first), each copy given up at most once while another holder keeps it."""
    held = frozenset().union(*(a.held for a in agents)) | {e for es in filled.values() for e in es}
    holders: dict[ExpertId, set[NodeId]] = {}
    for a in agents:
        for e in a.held:
            holders.setdefault(e, set()).add(a.node)
    copies = {a.node: {e for e in a.held if len(holders[e]) > 1 and e not in a.placed} for a in agents}
    queued = {a.node: len(filled.get(a.node, ())) for a in agents}
    per_layer = {a.node: _count_layers(a.held) for a in agents}
    out: dict[NodeId, tuple[list[ExpertId], list[ExpertId]]] = {}
    for eid in experts:
        if eid in held:
            continue
        open_ = [n for n in sorted(copies) if copies[n]]
        if not open_:
            break
        node = min(open_, key=lambda n: (queued[n], per_layer[n].get(eid.layer, 0), n))
        copy = max(copies[node], key=lambda c: (per_layer[node][c.layer], c.layer, c.index))
        holders[copy].discard(node)
        copies[node].discard(copy)
        if len(holders[copy]) == 1:  # the copy left is that agent's only one now
            copies[next(iter(holders[copy]))].discard(copy)
        per_layer[node][copy.layer] -= 1
        per_layer[node][eid.layer] = per_layer[node].get(eid.layer, 0) + 1
        queued[node] += 1
        loads, gone = out.setdefault(node, ([], []))
        loads.append(eid)
        gone.append(copy)
    return {n: (tuple(loads), tuple(gone)) for n, (loads, gone) in out.items()}


def _count_layers(experts: frozenset[ExpertId]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for e in experts:
        counts[e.layer] = counts.get(e.layer, 0) + 1
    return counts
