"""Prefill policies: how tokens are partitioned, who runs each expert, and what is prefetched.

`sirius` combines the three techniques (interleaved partition, adaptive token scheduling,
speculative prefetch), each of which can be switched off for ablations; `naive` and
`expert-parallel` are the baselines the benchmark compares against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from scheduler.cost_model import AgentProfile, CostModel
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

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"policy {self.name!r} is unknown (choose from {', '.join(POLICIES)})")

    @classmethod
    def from_flags(cls, name: str, no_interleave: bool = False, no_token_scheduling: bool = False,
                   no_prefetch: bool = False) -> Policy:
        sirius = name == "sirius"
        return cls(name, sirius and not no_interleave, sirius and not no_token_scheduling, sirius and not no_prefetch)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        off = [f for f, on in (("interleave", self.interleave), ("token-scheduling", self.token_scheduling),
                               ("prefetch", self.prefetch)) if not on]
        return self.name if self.name != "sirius" or not off else f"sirius --no-{' --no-'.join(off)}"

    def partition(self, token_ids: Sequence[int], nodes: Sequence[NodeId]) -> StepPlan:
        return zigzag_prefill(token_ids, nodes) if self.interleave else contiguous_prefill(token_ids, nodes)

    def route(self, layer: int, reports: Sequence[LayerReport], profiles: Mapping[NodeId, AgentProfile],
              cost: CostModel, num_experts: int) -> RoutingPlan:
        if self.name == "naive":  # every agent runs the experts of its own tokens
            return RoutingPlan(layer, {})
        if self.name == "expert-parallel":  # agent i owns experts [i*E/N, (i+1)*E/N) of every layer
            nodes = [r.node for r in reports]
            order = sorted(profiles)
            return RoutingPlan.whole(layer, {
                (n, e): order[e * len(order) // num_experts]
                for n, r in zip(nodes, reports) for e, c in enumerate(r.counts) if c
            })
        if self.token_scheduling:
            return schedule_layer(layer, reports, profiles, cost)
        return resident_first(layer, reports)

    def prefetches(self, layer: int, reports: Sequence[LayerReport], profiles: Mapping[NodeId, AgentProfile],
                   cost: CostModel, num_experts: int) -> dict[NodeId, tuple[int, ...]]:
        """Experts of `layer` each agent should start reading, from the previous layer's
        predicted counts: where the same policy would run them if the guess is right."""
        if not self.prefetch or not reports or not reports[0].predicted:
            return {}
        guessed = [
            LayerReport(r.node, r.predicted, r.next_resident, r.next_loading, resident_total=r.resident_total)
            for r in reports
        ]
        plan = self.route(layer, guessed, profiles, cost, num_experts)
        held = {r.node: r.next_resident | r.next_loading for r in reports}
        out: dict[NodeId, set[int]] = {}
        for (_, expert), shares in plan.shares.items():
            for executor, _ in shares:
                if expert not in held.get(executor, frozenset()):
                    out.setdefault(executor, set()).add(expert)
        return {n: tuple(sorted(es)) for n, es in out.items()}
