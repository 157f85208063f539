"""Prefill policies: how tokens are partitioned, who runs each expert, and what is prefetched.

`sirius` combines the three techniques (interleaved partition, adaptive token scheduling,
speculative prefetch), each of which can be switched off for ablations; `naive` and
`expert-parallel` are the baselines the benchmark compares against. Between requests, `sirius`
and `expert-parallel` fill free pooled memory with the experts no agent holds (`fill.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from protos.ids import ExpertId
from scheduler.cost_model import AgentProfile, CostModel
from scheduler.balance import SplitMode
from scheduler.fill import AgentHoldings, plan_fill, plan_swaps
from scheduler.partition import contiguous_prefill, zigzag_prefill
from scheduler.routing import resident_first
from scheduler.token_scheduling import schedule_layer
from scheduler.types import LayerReport, NodeId, RoutingPlan, StepPlan

PolicyName = Literal["sirius", "naive", "expert-parallel"]
POLICIES: tuple[PolicyName, ...] = ("sirius", "naive", "expert-parallel")


@dataclass(frozen=True)
class Policy:
    name: PolicyName = "sirius"
    interleave: bool = True  # zigzag partition of the prompt (sirius only)
    token_scheduling: bool = True  # cost-model scheduling; off: run where resident, else largest owner
    prefetch: bool = True  # speculative next-layer expert prefetch (sirius only)
    fill: bool = True  # read experts no agent holds into free memory after a request (not naive)
    # Whether token scheduling may run an expert no agent holds in slices over several agents
    # (the engine's `expert_split`; `never` without its load balance).
    split: SplitMode = "auto"

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"policy {self.name!r} is unknown (choose from {', '.join(POLICIES)})")

    @classmethod
    def from_flags(cls, name: str, no_interleave: bool = False, no_token_scheduling: bool = False,
                   no_prefetch: bool = False, no_fill: bool = False) -> Policy:
        sirius = name == "sirius"
        return cls(name, sirius and not no_interleave, sirius and not no_token_scheduling, sirius and not no_prefetch,  # type: ignore[arg-type]
                   name != "naive" and not no_fill)

    @property
    def label(self) -> str:
        off = [f for f, on in (("interleave", self.interleave), ("token-scheduling", self.token_scheduling),
                               ("prefetch", self.prefetch), ("fill", self.fill)) if not on]
        return self.name if self.name != "sirius" or not off else f"sirius --no-{' --no-'.join(off)}"

    def partition(self, token_ids: Sequence[int], nodes: Sequence[NodeId]) -> StepPlan:
        return zigzag_prefill(token_ids, nodes) if self.interleave else contiguous_prefill(token_ids, nodes)

    def route(self, layer: int, reports: Sequence[LayerReport], profiles: Mapping[NodeId, AgentProfile],
              cost: CostModel, num_experts: int, direct: Mapping[int, NodeId] | None = None,
              latency_s: Mapping[NodeId, float] | None = None) -> RoutingPlan:
        """direct: the layer's direct routes, which the agents have already followed; latency_s:
        each agent's one-way link latency (what a split's calls cost)."""
        if self.name == "naive":  # every agent runs the experts of its own tokens
            return RoutingPlan(layer, {})
        if self.name == "expert-parallel":  # agent i owns experts [i*E/N, (i+1)*E/N) of every layer
            order = sorted(profiles)
            return RoutingPlan.whole(layer, {
                (r.node, e): _static_owner(order, e, num_experts) for r in reports for e, c in enumerate(r.counts) if c
            })
        if self.token_scheduling:
            return schedule_layer(layer, reports, profiles, cost, direct, self.split, latency_s)
        return resident_first(layer, reports)

    def lookahead(self, layer: int, reports: Sequence[LayerReport], profiles: Mapping[NodeId, AgentProfile],
                  cost: CostModel, num_experts: int) -> tuple[dict[NodeId, tuple[int, ...]], dict[int, NodeId]]:
        """`layer`'s prefetches and direct routes, from one plan guessed from the previous
        layer's reports (the scheduler's step per layer; guessing is a whole token schedule)."""
        guess = self._guess(layer, reports, profiles, cost, num_experts)
        if guess is None:
            return {}, {}
        prefetch = self.prefetches(layer, reports, profiles, cost, num_experts, guess)
        return prefetch, self.direct_routes(layer, reports, profiles, cost, num_experts, prefetch, guess)

    def prefetches(self, layer: int, reports: Sequence[LayerReport], profiles: Mapping[NodeId, AgentProfile],
                   cost: CostModel, num_experts: int, guess: RoutingPlan | None = None) -> dict[NodeId, tuple[int, ...]]:
        """Experts of `layer` each agent should start reading, from the previous layer's
        predicted counts: where the same policy would run them if the guess is right, the
        experts with the most predicted tokens first, as many as `_prefetch_room` allows.
        guess: that plan, if already made."""
        plan = guess if guess is not None else self._guess(layer, reports, profiles, cost, num_experts)
        if plan is None:
            return {}
        by_node = {r.node: r for r in reports}
        held = {r.node: r.next_resident | r.next_loading for r in reports}
        wanted: dict[NodeId, dict[int, int]] = {}  # executor -> expert -> predicted tokens
        for (owner, expert), shares in plan.shares.items():
            for executor, _ in shares:
                if expert not in held[executor]:
                    tokens = wanted.setdefault(executor, {})
                    tokens[expert] = tokens.get(expert, 0) + by_node[owner].predicted[expert]
        out: dict[NodeId, tuple[int, ...]] = {}
        for node, tokens in wanted.items():
            ranked = sorted(tokens, key=lambda e: (-tokens[e], e))
            room = _prefetch_room(by_node[node], profiles[node], cost)
            if keep := ranked[:room]:
                out[node] = tuple(keep)
        return out

    def direct_routes(self, layer: int, reports: Sequence[LayerReport], profiles: Mapping[NodeId, AgentProfile],
                      cost: CostModel, num_experts: int, prefetch: Mapping[NodeId, Sequence[int]],
                      guess: RoutingPlan | None = None) -> dict[int, NodeId]:
        """Experts of `layer` that every owner should send straight to one executor as soon as its
        router has run: those that exactly one agent holds (or is now told to read) and that the
        plan guessed from the previous layer's prediction gives wholly to it. The layer's real
        plan would leave them there too (it splits an expert only among several holders, and a
        second copy costs a read), so the agents need not wait for it: it comes only after every
        agent's report, and the executors would idle until then. The plan keeps these routes
        (`route(direct=...)`) even where the guess was wrong; a wrong guess costs time, never
        correctness. Only with token scheduling and prediction (`sirius`). guess: as in
        `prefetches`."""
        if not (self.token_scheduling and len(reports) > 1):
            return {}
        plan = guess if guess is not None else self._guess(layer, reports, profiles, cost, num_experts)
        if plan is None:
            return {}
        held = {r.node: r.next_resident | r.next_loading | frozenset(prefetch.get(r.node, ())) for r in reports}
        out: dict[int, NodeId] = {}
        for e in range(num_experts):
            holders = [n for n, h in held.items() if e in h]
            executors = plan.executors(e)
            if len(holders) == 1 and executors == set(holders):
                out[e] = holders[0]
        return out

    def _guess(self, layer: int, reports: Sequence[LayerReport], profiles: Mapping[NodeId, AgentProfile],
               cost: CostModel, num_experts: int) -> RoutingPlan | None:
        """The plan for `layer` if the previous layer's reports predicted its routing right
        (None without a prediction)."""
        if not self.prefetch or not reports or not reports[0].predicted:
            return None
        guessed = [
            LayerReport(r.node, r.predicted, r.next_resident, r.next_loading, resident_total=r.resident_total)
            for r in reports
        ]
        # Guessed whole: the prefetch reads whole experts, and those it reads are then held,
        # which the layer's plan does not split.
        return replace(self, split="never").route(layer, guessed, profiles, cost, num_experts)

    def fills(self, agents: Sequence[AgentHoldings], experts: Sequence[ExpertId], expert_bytes: int,
              num_experts: int) -> dict[NodeId, tuple[ExpertId, ...]]:
        """Experts each agent should read into its free memory after a request. `naive` fills
        nothing: each of its agents runs the experts of its own tokens, so one agent's copy
        spares no other a read; `expert-parallel` fills each expert on its owner only."""
        if not self.fill or self.name == "naive":
            return {}
        order = sorted(a.node for a in agents)
        owner = (lambda e: _static_owner(order, e.index, num_experts)) if self.name == "expert-parallel" else None
        return plan_fill(agents, experts, expert_bytes, owner)

    def swaps(self, agents: Sequence[AgentHoldings], experts: Sequence[ExpertId], filled: Mapping[NodeId, Sequence[ExpertId]]
              ) -> dict[NodeId, tuple[tuple[ExpertId, ...], tuple[ExpertId, ...]]]:
        """For a pool whose memory holds every expert once, the experts the fills left on no
        agent, each read in place of a second copy (`plan_swaps`); none where the policy does
        not fill (`naive`, `--no-fill`), nor under `expert-parallel`, whose experts go to their
        owners only."""
        if not self.fill or self.name in ("naive", "expert-parallel"):
            return {}
        return plan_swaps(agents, experts, filled)


def _prefetch_room(r: LayerReport, p: AgentProfile, cost: CostModel) -> int | None:
    """How many experts an agent should read ahead (None: all). Into free memory, all of them.
    Past that, each prefetch evicts an expert that a later request will probably read back, and
    holds its slot a layer early, so fewer experts stay from request to request. That pays only
    where the disk would otherwise idle long enough: if the agent computes less between two
    layers' reads than one read takes (its share of this layer's experts and the next attention,
    from this layer's report), a prefetch saves little and costs reads, so it reads ahead only
    into free memory; otherwise the whole predicted layer, since its disk also idles while the
    other agents finish the layer. Measured side by side with two agents (bench profile): at 512
    tokens, reading every prediction ahead made warm requests read 53-87 experts against 52-66
    without prefetch, and slower (15.05 against 12.51 s); at 2048 it was faster warm than reading
    only what the compute window covers (11.60 against 12.31 s, 2 rounds), at 4096 too (17.4
    against 18.0 s, one round)."""
    free = p.free_slots(r.resident_total)
    if free is None or not cost.load_s(p):
        return None
    window_s = cost.compute_s(p, sum(r.counts)) + r.attention_s
    if window_s >= cost.load_s(p):
        return None
    return max(0, free)


def _static_owner(order: Sequence[NodeId], expert: int, num_experts: int) -> NodeId:
    """expert-parallel: agent i of the sorted names owns experts [i*E/N, (i+1)*E/N) of every layer."""
    return order[expert * len(order) // num_experts]
