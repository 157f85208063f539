"""Runs one prefill step of one request on the agents, layer by layer (the scheduler's loop
for sequence-parallel prefill; decode runs on a home agent without it, see `batching.py`).

    StepPlan (partition) -> BeginStep on every agent in the request
    per layer: Forward on agents with new tokens -> LayerReports -> RoutingPlan (routing), and
               the next layer's prefetches and direct routes (from the reports' predictions)
    Finish -> logits of the step's last position (or of every position)

Only decisions and small control messages pass through here; tensors go agent to agent. The
agents are reached through `AgentClient`s handed in, so tests and benchmarks drive the same loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from protos.convert import experts_from_wire
from protos.ids import ExpertId
from protos.messages import Peer
from scheduler.client import AgentClient, AgentInfo
from scheduler.cost_model import AgentProfile, CostModel
from scheduler.policy import Policy
from scheduler.types import LayerReport, NodeId, RoutingPlan, StepPlan

log = logging.getLogger("potluck.scheduler")


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_experts: int
    vocab_size: int
    dense_layers: frozenset[int] = frozenset()
    max_positions: int = 0  # context length

    def routed_experts(self) -> list[ExpertId]:
        """Every routed expert, layer by layer."""
        return [ExpertId(layer, e) for layer in range(self.num_layers) if layer not in self.dense_layers
                for e in range(self.num_experts)]


@dataclass(frozen=True)
class ClusterView:
    """What the scheduler knows of the agents it drives: the model's shape and each device."""

    shape: ModelShape
    profiles: dict[NodeId, AgentProfile]
    cost: CostModel
    latency_s: dict[NodeId, float] = field(default_factory=dict)  # each agent's one-way link latency

    @classmethod
    def from_infos(cls, infos: Sequence[AgentInfo]) -> ClusterView:
        i = infos[0]
        shape = ModelShape(i.num_layers, i.num_experts, i.vocab_size, i.dense_layers, i.max_positions)
        profiles = {
            a.name: AgentProfile(a.name, a.disk_bytes_per_s, a.link_bytes_per_s, a.flops_per_s,
                                 a.memory_bytes // a.expert_bytes if a.memory_bytes else None)
            for a in infos
        }
        # One SwiGLU expert on one token: 3 matmuls of D x I, 2 FLOPs per multiply-add.
        flops_per_token = 2.0 * i.expert_bytes / i.dtype_bytes
        return cls(shape, profiles, CostModel(i.expert_bytes, i.hidden_size * i.dtype_bytes, flops_per_token),
                   {a.name: a.link_latency_s for a in infos})


@dataclass(frozen=True)
class IdleHoldings:
    """The experts held by a step's members that have no new tokens, as the layer reports they
    would send: no tokens, and their cache state, so that a plan can run experts there."""

    num_experts: int
    held: dict[NodeId, frozenset[ExpertId]]  # node -> experts resident or loading

    def at(self, layer: int, predicted: bool = False) -> list[LayerReport]:
        """Reports after `layer`'s router (-1: after the embeddings); with predicted, also for
        the next layer, as a prefetch plan reads them."""
        E = self.num_experts

        def of(h: frozenset[ExpertId], at: int) -> frozenset[int]:
            return frozenset(e.index for e in h if e.layer == at)

        return [LayerReport(n, (0,) * E, of(h, layer), frozenset(), predicted=(0,) * E if predicted else (),
                            resident_total=len(h), next_resident=of(h, layer + 1) if predicted else frozenset())
                for n, h in self.held.items()]


class RequestRunner:
    def __init__(self, agents: Sequence[AgentClient], view: ClusterView, policy: Policy = Policy()) -> None:
        if not agents:
            raise ValueError("a request needs at least one agent")
        self.agents = {a.name: a for a in agents}
        self.view = view
        self.shape = view.shape
        self.policy = policy

    async def run_step(self, request_id: str, plan: StepPlan, all_logits: bool = False,
                       counts: list[int] | None = None) -> torch.Tensor:
        """Run one step on the agents; return logits [1, V] of its last position (or [T, V] of
        every new position, in position order, with all_logits). `counts` (MoE layers x experts,
        flat, layer by layer) gains the step's selections of each expert (for the home's decode
        prefetch)."""
        active = [s.node for s in plan.shards]
        members = [n for n in self.agents if n in plan.cached or n in active]
        spans = {s.node: (min(s.positions), max(s.positions)) for s in plan.shards}
        peers = [
            Peer(name=n, address=self.agents[n].spec.address, new_min=spans.get(n, (-1, -1))[0],
                 new_max=spans.get(n, (-1, -1))[1], cached=plan.cached.get(n, 0))
            for n in members
        ]
        shape, cost, policy = self.shape, self.view.cost, self.policy
        profiles = {n: self.view.profiles[n] for n in members}
        guess = policy.prefetch and 0 not in shape.dense_layers
        # Members without new tokens (every agent but one, in a decode step) run no layer, but
        # they hold experts: the plans count them as executors, from the holdings their BeginStep
        # replies list (their cache state as the step begins).
        idle = [n for n in members if n not in active]
        begun = await asyncio.gather(*(
            self.agents[n].begin_step(request_id, plan, peers, all_logits, guess, holdings=n in idle) for n in members
        ))
        E = shape.num_experts
        idle_reports = IdleHoldings(E, {
            b.report.node: experts_from_wire(b.held, E) for b in begun if b.report.node in idle
        })
        routing: RoutingPlan | None = None
        # Layer 0's experts, guessed from the embeddings, load while layer 0's attention runs.
        first = [b.report for b in begun if b.report.node in active] + idle_reports.at(-1, predicted=True)  # what layer 0 needs
        prefetch, direct = policy.lookahead(0, first, profiles, cost, E) if guess else ({}, {})
        for layer in range(shape.num_layers):
            predict = policy.prefetch and layer + 1 < shape.num_layers and layer + 1 not in shape.dense_layers
            reports = await asyncio.gather(*(
                self.agents[n].forward(request_id, layer, routing, prefetch.get(n, ()), predict, direct) for n in active
            ))
            if counts is not None and layer not in shape.dense_layers:
                row = sum(1 for d in range(layer) if d not in shape.dense_layers) * E
                for r in reports:
                    for e, c in enumerate(r.counts):
                        counts[row + e] += c
            reports += idle_reports.at(layer, predict)
            moe = layer not in shape.dense_layers
            # Pure Python, and tens of ms a layer on a large model over many agents: worked out
            # off the event loop, which serves the running requests' decode steps meanwhile.
            routing, (prefetch, direct) = (await asyncio.to_thread(
                _plan_layer, policy, layer, reports, profiles, cost, E, direct, self.view.latency_s, moe, predict)
                if moe or predict else (None, ({}, {})))
        finished = await asyncio.gather(*(self.agents[n].finish(request_id, routing) for n in active))
        parts = [(logits, positions) for logits, positions in finished if logits is not None]
        if not parts:
            raise RuntimeError(f"no agent returned logits for step {plan.step} of {request_id}")
        order = torch.tensor([p for _, positions in parts for p in positions]).argsort()
        return torch.cat([logits for logits, _ in parts])[order]  # rows in position order

    async def release(self, request_id: str, nodes: Sequence[NodeId]) -> None:
        """Drop the request's state everywhere; runs even when the request was cancelled."""
        results = await asyncio.gather(*(self.agents[n].release(request_id) for n in nodes), return_exceptions=True)
        for node, result in zip(nodes, results):
            if isinstance(result, BaseException):
                log.warning("release of %s on %s failed: %s", request_id, node, result)

    async def prefill_logits(self, request_id: str, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits [T, V] of every prompt position (for equivalence tests), state released after."""
        try:
            return await self.run_step(request_id, self.policy.partition(token_ids, list(self.agents)), all_logits=True)
        finally:
            await asyncio.shield(self.release(request_id, list(self.agents)))


def _plan_layer(policy: Policy, layer: int, reports: Sequence[LayerReport], profiles: Mapping[NodeId, AgentProfile],
                cost: CostModel, num_experts: int, direct: Mapping[int, NodeId], latency_s: Mapping[NodeId, float],
                moe: bool, predict: bool
                ) -> tuple[RoutingPlan | None, tuple[dict[NodeId, tuple[int, ...]], dict[int, NodeId]]]:
    """A layer's routing plan (None for a dense layer) and the next layer's prefetches and direct
    routes (none without `predict`), from its reports."""
    routing = policy.route(layer, reports, profiles, cost, num_experts, direct, latency_s) if moe else None
    ahead = policy.lookahead(layer + 1, reports, profiles, cost, num_experts) if predict else ({}, {})
    return routing, ahead
