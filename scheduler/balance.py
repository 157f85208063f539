"""Which experts of a step run whole and which split across agents (expert tensor parallelism).

An expert split m ways runs as m slices on m agents: the gate and up projections by columns and
the down projection by rows, each slice a 1/m share of the intermediate units. Every agent reads
only its slice's bytes, computes 1/m of the expert on the same tokens, and sends the home a
partial output as wide as the hidden state; the home sums them. Whole experts on separate agents
leave one agent with most of a skewed step's work (or one disk with every read); split, each
does 1/m of it. Splitting costs a round trip and the tokens' hidden states to and from every
agent it uses, so it pays where reads or compute outweigh the link.

    the step's needs (expert, tokens, who holds what) + each agent's profile
      -> balance(...): longest first, each expert whole on one agent or split over the m agents
         that finish it soonest, whichever ends the step soonest (ties: fewer agents)
      = [Run(expert, nodes)]: nodes[i] runs slice i of len(nodes) (one node: whole)

The timing model is `cost_model`'s: per agent, its disk, compute and link each add up and
overlap, plus one latency each way for an agent other than the home. Decode passes one token per
request; prefill passes a chunk's token counts, with the same function.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from protos.ids import ExpertId, NodeId, SliceId
from scheduler.cost_model import AgentProfile, AgentTime, CostModel

SplitMode = Literal["auto", "never", "always"]
# `Timeline.end_s`'s answers: (agent, cut, whether it holds the slice, tokens) -> its finish.
Ends = dict[tuple[NodeId, int, bool, int], float]


@dataclass(frozen=True)
class Slice:
    """Slice `index` of an expert cut `of` ways; Slice(0, 1) is the whole expert."""

    index: int
    of: int


WHOLE = Slice(0, 1)


@dataclass(frozen=True)
class Need:
    """An expert the step needs, the tokens routed to it, and what each agent holds of it."""

    expert: ExpertId
    tokens: int
    held: Mapping[NodeId, frozenset[Slice]] = field(default_factory=dict)

    def has(self, node: NodeId, part: Slice) -> bool:
        return self.holds(node, part.index, part.of)

    def holds(self, node: NodeId, index: int, of: int) -> bool:
        """`has(node, Slice(index, of))`, with no Slice made: the balance asks this most."""
        whole, parts = self._holdings
        return node in whole or (node, index, of) in parts

    @cached_property
    def _holdings(self) -> tuple[frozenset[NodeId], frozenset[tuple[NodeId, int, int]]]:
        """(agents holding it whole, (agent, index, of) of every slice held), as plain tuples:
        a frozen dataclass's hash is a Python call, and a table of a 48-layer, 128-expert model
        on 8 agents made about a million."""
        whole = frozenset(n for n, got in self.held.items() if WHOLE in got)
        return whole, frozenset((n, s.index, s.of) for n, got in self.held.items() for s in got)

    def cuts(self, of: int) -> bool:
        """Whether some agent holds a slice of it cut `of` ways."""
        return any(o == of for _, _, o in self._holdings[1])


@dataclass(frozen=True)
class Run:
    """Where an expert runs: whole on nodes[0], or slice i of len(nodes) on nodes[i]."""

    expert: ExpertId
    nodes: tuple[NodeId, ...]

    @property
    def split(self) -> bool:
        return len(self.nodes) > 1


@dataclass(frozen=True)
class Agent:
    """An agent as the balance sees it: its profile, its one-way link latency, and the seconds
    of disk, compute and link it already has to spend (reads queued before this step; in a
    prefill layer, the work the token scheduling gave it before this expert)."""

    profile: AgentProfile
    latency_s: float = 0.0
    busy: AgentTime = field(default_factory=AgentTime)

    @property
    def node(self) -> NodeId:
        return self.profile.node


class Timeline:
    """Each agent's seconds of disk, compute and link so far in the step."""

    def __init__(self, agents: Sequence[Agent], home: NodeId, model: CostModel,
                 start_ends: Ends | None = None) -> None:
        """`start_ends`: `end_s`'s answers before any work is added, to share between timelines of
        the same agents, home and model (the decode tables balance each kind of expert from the
        same start)."""
        self.agents = {a.node: a for a in agents}
        self.home, self.model = home, model
        self.time = {a.node: _plus(a.busy, AgentTime()) for a in agents}  # copies
        self.called: set[NodeId] = set()  # agents other than the home given work: a round trip each
        self._ends: Ends = {} if start_ends is None else start_ends  # `end_s`'s answers since the last `add`

    def added(self, node: NodeId, need: Need, part: Slice) -> AgentTime:
        """The seconds `part` of `need` adds on `node`: its read unless held, its compute, and
        the tokens' hidden states there and back unless `node` is the home."""
        p, m = self.agents[node].profile, self.model
        read = 0.0 if need.has(node, part) else m.load_s(p) / part.of
        link = 0.0 if node == self.home else 2 * m.send_s(p, need.tokens)
        return AgentTime(read, m.compute_s(p, need.tokens) / part.of, link)

    def finish_s(self, node: NodeId, extra: AgentTime | None = None) -> float:
        t = self.time[node] if extra is None else _plus(self.time[node], extra)
        called = node != self.home and (extra is not None or node in self.called)
        return t.finish_s + (2 * self.agents[node].latency_s if called else 0.0)

    def end_s(self, node: NodeId, need: Need, index: int, of: int) -> float:
        """When `node` would finish with slice `index` of `of` of `need` added (of 1: whole).
        What it adds depends on the need only through whether `node` holds that slice and the
        tokens, so the answer is kept, by those, until the timeline next changes: the options
        of one need, and the needs alike that follow it, ask again for the same few."""
        holds = need.holds(node, index, of)
        key = (node, of, holds, need.tokens)
        end = self._ends.get(key)
        if end is None:
            end = self._ends[key] = self.finish_s(node, self.added(node, need, Slice(index, of)))
        return end

    def step_s(self) -> float:
        return max((self.finish_s(n) for n in self.time), default=0.0)

    def add(self, node: NodeId, extra: AgentTime) -> None:
        self._ends = {}
        self.time[node] = _plus(self.time[node], extra)
        if node != self.home:
            self.called.add(node)

    def place(self, run: Run, need: Need) -> None:
        m = len(run.nodes)
        for i, node in enumerate(run.nodes):
            self.add(node, self.added(node, need, Slice(i, m) if m > 1 else WHOLE))


def _plus(a: AgentTime, b: AgentTime) -> AgentTime:
    return AgentTime(a.disk_s + b.disk_s, a.compute_s + b.compute_s, a.link_s + b.link_s)


def finish_s(agents: Sequence[Agent], home: NodeId, model: CostModel, needs: Sequence[Need],
             runs: Sequence[Run]) -> float:
    """The step's finish time under the model if the needs run as `runs` (one per need)."""
    line = Timeline(agents, home, model)
    by_expert = {n.expert: n for n in needs}
    for run in runs:
        line.place(run, by_expert[run.expert])
    return line.step_s()


def _options(line: Timeline, need: Need, mode: SplitMode, max_split: int) -> list[Run]:
    """Whole on each agent; and for each m, split over the m agents whose latest-ending slice
    ends soonest (`_slices`)."""
    nodes = sorted(line.time)
    out: list[Run] = []
    if mode != "always" or len(nodes) < 2:
        out += [Run(need.expert, (n,)) for n in nodes]
    if mode == "never":
        return out
    out += [Run(need.expert, _slices(line, need, nodes, m)) for m in range(2, min(max_split, len(nodes)) + 1)]
    return out


def _slices(line: Timeline, need: Need, nodes: list[NodeId], m: int) -> tuple[NodeId, ...]:
    """Slice i of m to a distinct agent each, so that the slice ending last ends soonest (a
    bottleneck assignment: the least bound under which every slice finds its own agent, by
    augmenting paths). An agent holding a slice ends it sooner, having nothing to read."""
    if not need.cuts(m):
        # No agent holds a slice of m: each agent ends any slice alike, and the assignment is
        # the m that end soonest (ties by name), in name order. This is what the search below
        # returns there, at a fraction of the cost (the prefill's token scheduling asks for
        # every unheld expert of a layer, each time a split is weighed).
        ends_at = {n: line.end_s(n, need, 0, m) for n in nodes}
        return tuple(sorted(sorted(nodes, key=lambda n: (ends_at[n], n))[:m]))
    # Slice i differs on an agent only in whether it holds it (`Timeline.end_s` keeps both).
    ends = {(i, n): line.end_s(n, need, i, m) for i in range(m) for n in nodes}
    order = {i: sorted(nodes, key=lambda n: (ends[i, n], n)) for i in range(m)}  # soonest first
    bounds = sorted(set(ends.values()))
    lo, hi = 0, len(bounds) - 1  # seating is monotone in the bound: find the least that seats all
    while lo < hi:
        mid = (lo + hi) // 2
        if _seat_all(ends, order, m, bounds[mid]) is None:
            lo = mid + 1
        else:
            hi = mid
    owner = _seat_all(ends, order, m, bounds[lo])
    assert owner is not None, "m <= len(nodes): the largest bound seats every slice"
    # The same agents in name order where that keeps the bound: every home then asks an agent
    # for the same slice, which it may hold from the last time.
    canonical = sorted(owner)
    if all(ends[i, n] <= bounds[lo] for i, n in enumerate(canonical)):
        return tuple(canonical)
    by_slice = {i: n for n, i in owner.items()}
    return tuple(by_slice[i] for i in range(m))


def _seat_all(ends: Mapping[tuple[int, NodeId], float], order: Mapping[int, list[NodeId]], m: int, bound: float
              ) -> dict[NodeId, int] | None:
    """Agent -> its slice, every slice on an agent that ends it by `bound`; None if none fits.
    `order`: per slice, the agents by when they would end it (then by name)."""
    owner: dict[NodeId, int] = {}

    def seat(i: int, seen: set[NodeId]) -> bool:
        for n in order[i]:
            if ends[i, n] <= bound and n not in seen:
                seen.add(n)
                if n not in owner or seat(owner[n], seen):
                    owner[n] = i
                    return True
        return False

    return owner if all(seat(i, set()) for i in range(m)) else None


def _trial(line: Timeline, run: Run, need: Need, split_overhead_s: float, now: Mapping[NodeId, float]
           ) -> tuple[float, float, int]:
    """(the step's finish with `run` added, the seconds it adds over its agents, its agents);
    `now`: each agent's finish before it."""
    m = len(run.nodes)
    ends = {n: line.end_s(n, need, i, m) for i, n in enumerate(run.nodes)}  # (m = 1: i = 0, whole)
    last = max([*ends.values(), *(t for n, t in now.items() if n not in ends)], default=0.0)
    spent = sum(t - now[n] for n, t in ends.items())
    return last + (split_overhead_s if m > 1 else 0.0), spent, m


def balance(agents: Sequence[Agent], home: NodeId, model: CostModel, needs: Sequence[Need],
            mode: SplitMode = "auto", max_split: int | None = None, split_overhead_s: float = 0.0,
            start_ends: Ends | None = None) -> list[Run]:
    """Each need's run, chosen to end the step soonest: the needs in order of their cheapest
    whole run, longest first (as LPT scheduling), each given the option (whole on one agent, or
    split over m agents, m up to `max_split`) that ends the step soonest so far; ties go to the
    option that adds the fewest seconds, then to fewer agents. `never` only runs experts whole,
    `always` only split (where there are two agents or more); `auto` weighs both, so a resident
    expert is split only where that ends the step sooner, by more than `split_overhead_s` (what
    the model leaves out of a split: the calls' and the partial sums' own cost). `start_ends`:
    as `Timeline`'s, shared by calls with the same agents, home and model."""
    if not agents:
        raise ValueError("balance needs at least one agent")
    if mode not in ("auto", "never", "always"):
        raise ValueError(f"split mode must be auto, never or always, got {mode!r}")
    line = Timeline(agents, home, model, start_ends)
    widest = len(agents) if max_split is None else max(1, min(max_split, len(agents)))

    def cheapest_whole(need: Need) -> float:
        return min(line.added(a.node, need, WHOLE).finish_s for a in agents)

    runs: dict[ExpertId, Run] = {}
    for need in sorted(needs, key=lambda n: (-cheapest_whole(n), n.expert)):
        now = {n: line.finish_s(n) for n in line.time}
        best = min(_options(line, need, mode, widest),
                   key=lambda r: (*_trial(line, r, need, split_overhead_s, now), r.nodes))
        line.place(best, need)
        runs[need.expert] = best
    return [runs[n.expert] for n in needs]


# Experts of one decode layer that no agent holds, as the decode tables plan for: a one-token step
# needs top-k experts a layer (2 in Mixtral, 8 in Qwen3-30B-A3B, most of them held).
DECODE_STEP_UNHELD = 2


# A kind of expert, as a decode table sees it: the agents holding it whole, and the (agent, slice)
# pairs held of it. Experts of one kind get the same run.
Kind = tuple[frozenset[NodeId], frozenset[tuple[NodeId, Slice]]]


def expert_kinds(experts: Iterable[ExpertId], held: Mapping[NodeId, frozenset[ExpertId]],
                 slices: Mapping[NodeId, frozenset[SliceId]]) -> dict[Kind, list[ExpertId]]:
    """`experts` grouped by kind: who holds each whole, and which slices of it are held where."""
    holders_of: dict[ExpertId, set[NodeId]] = {}
    for node, experts_held in held.items():
        for eid in experts_held:
            holders_of.setdefault(eid, set()).add(node)
    parts_of: dict[ExpertId, set[tuple[NodeId, Slice]]] = {}
    for node, held_slices in slices.items():
        for s in held_slices:
            parts_of.setdefault(s.expert, set()).add((node, Slice(s.part, s.of)))
    kinds: dict[Kind, list[ExpertId]] = {}
    for eid in experts:
        kinds.setdefault((frozenset(holders_of.get(eid, ())), frozenset(parts_of.get(eid, ()))), []).append(eid)
    return kinds


def decode_runs(agents: Sequence[Agent], home: NodeId, model: CostModel, kinds: Mapping[Kind, Sequence[ExpertId]],
                mode: SplitMode = "auto", split_overhead_s: float = 0.0, per_step: int = DECODE_STEP_UNHELD,
                known: dict[Kind, list[Run]] | None = None) -> dict[ExpertId, tuple[NodeId, ...]]:
    """Where `home` runs each expert of `kinds` that it does not hold in a decode step, where
    that is not the default (whole on a holder, else read by the home): split, slice i on
    nodes[i], or whole on another agent that reads it (nodes of one). From `balance` of a
    one-token step that needs `per_step` experts alike in what each agent holds of them (whole,
    or slices); expert e takes the run of the (e mod per_step)-th, so that two such experts of
    one step tend to go to different disks. Experts of a kind get the same answer, computed
    once (most share one: held by nobody, or by one agent); `kinds` is `expert_kinds`, one
    grouping for every home. The scheduler publishes the result in the home's routing table.

    Per table rather than per step, a departure from the balance of a whole step: the home
    cannot import the scheduler, and its step's experts are only known on it. What the table
    cannot see is which experts one step really needs together, or reads already queued.

    `known`: answers worked out before for the same agents, home, model and settings, by kind;
    read and added to (`decode_plan.RunsMemo` keeps them from one table to the next)."""
    alike: dict[Kind, list[Run]] = {} if known is None else known
    start: Ends = {}  # every kind's balance starts from the same timeline
    out: dict[ExpertId, tuple[NodeId, ...]] = {}
    for key, eids in kinds.items():
        whole, parts = key
        if home in whole:
            continue
        if key not in alike:
            got: dict[NodeId, set[Slice]] = {n: {WHOLE} for n in whole}
            for node, part in parts:
                got.setdefault(node, set()).add(part)
            needs = [Need(ExpertId(-1, j), 1, {n: frozenset(p) for n, p in got.items()}) for j in range(per_step)]
            alike[key] = balance(agents, home, model, needs, mode, split_overhead_s=split_overhead_s,
                                 start_ends=start)
        runs = alike[key]
        for eid in eids:
            run = runs[eid.index % per_step]
            if run.split or (not whole and run.nodes[0] != home):
                out[eid] = run.nodes
    return out
