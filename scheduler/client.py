"""gRPC client the scheduler uses to drive one agent (control plane only: small messages)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import torch

from protos.convert import DecodeToken, decode_step_to_proto, direct_to_proto, routing_table_to_proto, tensor_from_proto
from protos.limits import CHANNEL_OPTIONS
from protos.potluck.v1 import agent_pb2 as pb
from protos.potluck.v1 import agent_pb2_grpc as pb_grpc
from protos.routing import RoutingTable
from scheduler.errors import AgentFailed
from scheduler.types import AgentSnapshot, LayerReport, NodeId, NodeSpec, RoutingPlan, StepPlan



@dataclass(frozen=True)
class AgentInfo:
    name: NodeId
    model_type: str
    num_layers: int
    num_experts: int
    vocab_size: int
    fingerprint: str
    expert_bytes: int  # one expert in the agent's memory
    memory_bytes: int  # expert buffer budget, 0 = unlimited
    disk_bytes_per_s: float  # 0 = unlimited
    link_bytes_per_s: float  # 0 = unlimited
    max_positions: int  # the model's context length
    dense_layers: frozenset[int]  # layers without routed experts
    flops_per_s: float  # measured expert matmul speed
    hidden_size: int  # D
    dtype_bytes: int  # bytes per element on the wire
    link_latency_s: float = 0.0  # one-way delay of each message the agent sends, seconds; 0 = none
    data_port: int = 0  # TCP port of its decode data plane on its gRPC host (0: none)


def plan_to_proto(plan: RoutingPlan | None) -> pb.RoutingPlan | None:
    if plan is None:
        return None
    return pb.RoutingPlan(
        layer=plan.layer,
        assignments=[
            pb.ExpertAssignment(expert=e, owner=o, executor=x, tokens=n)
            for (o, e), shares in sorted(plan.shares.items())
            for x, n in shares
        ],
    )


def plan_from_proto(msg: pb.RoutingPlan) -> RoutingPlan:
    shares: dict[tuple[NodeId, int], tuple[tuple[NodeId, int], ...]] = {}
    for a in msg.assignments:
        key = (NodeId(a.owner), a.expert)
        shares[key] = (*shares.get(key, ()), (NodeId(a.executor), a.tokens))
    return RoutingPlan(msg.layer, shares)


@dataclass(frozen=True)
class StepBegun:
    """An agent's answer to BeginStep."""

    report: LayerReport  # with predict: layer 0's routing guessed from the embeddings, and its cache state
    held: frozenset[int]  # with holdings: layer * num_experts + index of every expert resident or being read


class AgentClient:
    def __init__(self, spec: NodeSpec, timeout_s: float = 300.0) -> None:
        self.spec = spec
        self.timeout_s = timeout_s  # deadline of one control call (a Forward may wait on disk reads)
        self._channel = grpc.aio.insecure_channel(spec.address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.NodeAgentStub(self._channel)

    @property
    def name(self) -> NodeId:
        return self.spec.name

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, request: object, timeout_s: float | None = None) -> object:
        try:
            return await getattr(self._stub, method)(request, timeout=timeout_s or self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise AgentFailed(f"agent {self.spec.name} ({self.spec.address}) {method}: {exc.code().name}: {exc.details()}") from exc

    async def info(self, timeout_s: float = 5.0) -> AgentInfo:
        r = await self._call("Info", pb.InfoRequest(), timeout_s)
        assert isinstance(r, pb.InfoReply)
        p = r.profile
        return AgentInfo(
            name=NodeId(r.name), model_type=r.model_type, num_layers=r.num_layers, num_experts=r.num_experts,
            vocab_size=r.vocab_size, fingerprint=r.model_fingerprint, expert_bytes=r.expert_bytes,
            memory_bytes=p.expert_memory_bytes, disk_bytes_per_s=p.disk_bytes_per_s,
            link_bytes_per_s=p.link_bytes_per_s, link_latency_s=p.link_latency_s, max_positions=r.max_positions,
            dense_layers=frozenset(r.dense_layers), flops_per_s=r.expert_flops_per_s, hidden_size=r.hidden_size,
            dtype_bytes=r.dtype_bytes, data_port=r.data_port,
        )

    async def begin_step(self, request_id: str, plan: StepPlan, peers: Sequence[pb.StepPeer], all_logits: bool,
                         predict: bool = False, holdings: bool = False) -> StepBegun:
        """Start a step; with predict, the report carries layer 0's routing guessed from embeddings;
        with holdings, the reply lists every expert the agent holds."""
        shard = next((s for s in plan.shards if s.node == self.spec.name), None)
        r = await self._call("BeginStep", pb.BeginStepRequest(
            request_id=request_id, step=plan.step, token_ids=shard.token_ids if shard else (),
            positions=shard.positions if shard else (), peers=peers, all_logits=all_logits, predict=predict,
            holdings=holdings))
        assert isinstance(r, pb.BeginStepReply)
        report = LayerReport(self.spec.name, (), frozenset(), frozenset(), predicted=tuple(r.predicted_counts),
                             resident_total=r.resident_total, next_resident=frozenset(r.next_resident),
                             next_loading=frozenset(r.next_loading))
        return StepBegun(report, frozenset(r.held))

    async def forward(self, request_id: str, layer: int, plan: RoutingPlan | None, prefetch: Sequence[int] = (),
                      predict: bool = False, direct: Mapping[int, NodeId] | None = None) -> LayerReport:
        msg = pb.ForwardRequest(request_id=request_id, layer=layer, plan=plan_to_proto(plan), prefetch=prefetch,
                                predict=predict, direct=direct_to_proto(direct or {}))
        r = await self._call("Forward", msg)
        assert isinstance(r, pb.ForwardReply)
        return LayerReport(self.spec.name, tuple(r.expert_token_counts), frozenset(r.resident_experts),
                           frozenset(r.loading_experts), r.attention_seconds, tuple(r.predicted_counts),
                           r.resident_total, frozenset(r.next_resident), frozenset(r.next_loading))

    async def finish(self, request_id: str, plan: RoutingPlan | None) -> tuple[torch.Tensor | None, list[int]]:
        r = await self._call("Finish", pb.FinishRequest(request_id=request_id, plan=plan_to_proto(plan)))
        assert isinstance(r, pb.FinishReply)
        if not r.HasField("logits"):
            return None, []
        return tensor_from_proto(r.logits), list(r.positions)

    async def adopt_kv(self, request_id: str, capacity: int, prompt_tokens: int,
                       sources: Sequence[tuple[NodeId, str]]) -> int:
        """Make this agent the request's home for decode (it pulls the prompt's K/V from the
        (name, address) sources in the background); returns the K/V rows it held already."""
        r = await self._call("AdoptKV", pb.AdoptKVRequest(
            request_id=request_id, capacity=capacity, prompt_tokens=prompt_tokens,
            sources=[pb.AgentAddress(name=n, address=a) for n, a in sources]))
        assert isinstance(r, pb.AdoptKVReply)
        return r.local_tokens

    async def decode_step(self, tokens: Sequence[DecodeToken]) -> tuple[torch.Tensor, int]:
        """Logits [n, V] of one decode step of the requests homed here (row i for tokens[i]),
        and the round trips to peers the step made."""
        r = await self._call("DecodeStep", decode_step_to_proto(tokens))
        assert isinstance(r, pb.DecodeStepReply)
        logits = tensor_from_proto(r.logits)
        if logits.dim() != 2 or logits.shape[0] != len(tokens):
            raise AgentFailed(f"agent {self.spec.name} returned logits of shape {list(logits.shape)} for "
                              f"{len(tokens)} tokens")
        return logits, r.round_trips

    async def set_routing_table(self, table: RoutingTable, num_experts: int) -> None:
        await self._call("SetRoutingTable", routing_table_to_proto(table, num_experts), 5.0)

    async def release(self, request_id: str) -> None:
        await self._call("Release", pb.ReleaseRequest(request_id=request_id), 10.0)

    async def resident(self) -> list[int]:
        """Resident experts as layer * num_experts + index."""
        r = await self._call("CacheState", pb.CacheStateRequest(), 5.0)
        assert isinstance(r, pb.CacheStateReply)
        return list(r.resident)

    async def snapshot(self) -> AgentSnapshot:
        r = await self._call("CacheState", pb.CacheStateRequest(), 5.0)
        assert isinstance(r, pb.CacheStateReply)
        c = r.counters
        return AgentSnapshot(
            name=self.spec.name, address=self.spec.address, up=True, hits=c.hits, misses=c.misses, loads=c.loads,
            evictions=c.evictions, bytes_read=c.bytes_read, bytes_sent=c.bytes_sent, bytes_used=c.bytes_used,
            capacity_bytes=c.capacity_bytes, attention_s=c.attention_seconds, prefetches=c.prefetches,
            predicted_used=c.predicted_used, used=c.used, predicted_pairs_used=c.predicted_pairs_used,
            pairs_used=c.pairs_used, compute_overrun_s=c.compute_overrun_seconds,
            early_used=c.early_experts_used, early_dropped=c.early_experts_dropped, fills=c.fills,
            fill_preemptions=c.fill_preemptions, direct_sent=c.direct_experts_sent, decode_steps=c.decode_steps,
            decode_tokens=c.decode_tokens, decode_round_trips=c.decode_round_trips,
            decode_remote_experts=c.decode_remote_experts, requests=c.requests, held=frozenset(r.resident) | frozenset(r.loading))

    async def fill(self, experts: Sequence[int]) -> list[int]:
        """Ask the agent to read these experts (layer * num_experts + index) into free memory at
        its disk's lowest priority; returns those it took (the rest found no room)."""
        r = await self._call("Fill", pb.FillRequest(experts=experts), 5.0)
        assert isinstance(r, pb.FillReply)
        return list(r.accepted)
