"""The control plane's messages (scheduler -> agent) and decode's (scheduler -> home agent)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict

import torch

from protos.ids import NodeId, RequestId
from protos.messages import (AdoptKV, AgentInfo, BeginStep, CacheCounters, CacheState, DecodeResult, DecodeSpan, Forward,
                             LayerReport, Peer, RoutingPlan, SamplingParams, StepBegun, TokenEvent)
from protos.potluck.v1 import agent_pb2 as pb
from protos.routing import ExpertSplit, RoutingTable
from protos.convert.tensors import expert_from_wire, expert_to_wire, tensor_from_proto, tensor_into, tensor_to_proto


# Control plane (scheduler -> agent) -----------------------------------------------------------


def info_to_proto(info: AgentInfo) -> pb.InfoReply:
    profile = pb.DeviceProfile(expert_memory_bytes=info.memory_bytes, disk_bytes_per_s=info.disk_bytes_per_s,
                               link_bytes_per_s=info.link_bytes_per_s, compute_share=info.compute_share,
                               link_latency_s=info.link_latency_s)
    return pb.InfoReply(name=info.name, model_type=info.model_type, num_layers=info.num_layers,
                        num_experts=info.num_experts, vocab_size=info.vocab_size, profile=profile,
                        model_fingerprint=info.fingerprint, expert_bytes=info.expert_bytes,
                        expert_flops_per_s=info.flops_per_s, hidden_size=info.hidden_size,
                        dtype_bytes=info.dtype_bytes, max_positions=info.max_positions,
                        dense_layers=sorted(info.dense_layers), data_port=info.data_port)


def info_from_proto(msg: pb.InfoReply) -> AgentInfo:
    p = msg.profile
    return AgentInfo(name=NodeId(msg.name), model_type=msg.model_type, num_layers=msg.num_layers,
                     num_experts=msg.num_experts, vocab_size=msg.vocab_size, fingerprint=msg.model_fingerprint,
                     expert_bytes=msg.expert_bytes, memory_bytes=p.expert_memory_bytes,
                     disk_bytes_per_s=p.disk_bytes_per_s, link_bytes_per_s=p.link_bytes_per_s,
                     max_positions=msg.max_positions, dense_layers=frozenset(msg.dense_layers),
                     flops_per_s=msg.expert_flops_per_s, hidden_size=msg.hidden_size, dtype_bytes=msg.dtype_bytes,
                     link_latency_s=p.link_latency_s, data_port=msg.data_port, compute_share=p.compute_share)


def step_peer_to_proto(peer: Peer) -> pb.StepPeer:
    return pb.StepPeer(name=peer.name, address=peer.address, new_min_position=peer.new_min,
                       new_max_position=peer.new_max, cached_tokens=peer.cached)


def step_peer_from_proto(msg: pb.StepPeer) -> Peer:
    return Peer(name=msg.name, address=msg.address, new_min=msg.new_min_position, new_max=msg.new_max_position,
                cached=msg.cached_tokens)


def begin_step_to_proto(begin: BeginStep) -> pb.BeginStepRequest:
    return pb.BeginStepRequest(request_id=begin.request_id, step=begin.step, token_ids=begin.token_ids,
                               positions=begin.positions, peers=[step_peer_to_proto(p) for p in begin.peers],
                               all_logits=begin.all_logits, predict=begin.predict, holdings=begin.holdings)


def begin_step_from_proto(msg: pb.BeginStepRequest) -> BeginStep:
    return BeginStep(request_id=msg.request_id, step=msg.step, token_ids=tuple(msg.token_ids),
                     positions=tuple(msg.positions), peers=tuple(step_peer_from_proto(p) for p in msg.peers),
                     all_logits=msg.all_logits, predict=msg.predict, holdings=msg.holdings)


def step_begun_to_proto(begun: StepBegun) -> pb.BeginStepReply:
    """Of the report, what the embeddings give: the prediction and the cache state."""
    r = begun.report
    return pb.BeginStepReply(predicted_counts=r.predicted, next_resident=sorted(r.next_resident),
                             next_loading=sorted(r.next_loading), resident_total=r.resident_total,
                             held=sorted(begun.held))


def step_begun_from_proto(msg: pb.BeginStepReply, node: NodeId) -> StepBegun:
    report = LayerReport(node=node, counts=(), resident=frozenset(), loading=frozenset(),
                         predicted=tuple(msg.predicted_counts), resident_total=msg.resident_total,
                         next_resident=frozenset(msg.next_resident), next_loading=frozenset(msg.next_loading))
    return StepBegun(report=report, held=frozenset(msg.held))


def routing_plan_to_proto(plan: RoutingPlan) -> pb.RoutingPlan:
    return pb.RoutingPlan(
        layer=plan.layer,
        assignments=[
            pb.ExpertAssignment(expert=e, owner=o, executor=x, tokens=n)
            for (o, e), shares in sorted(plan.shares.items())
            for x, n in shares
        ],
        splits=[pb.SplitRun(expert=e, nodes=list(nodes)) for e, nodes in sorted(plan.splits.items())],
    )


def routing_plan_from_proto(msg: pb.RoutingPlan) -> RoutingPlan:
    shares: dict[tuple[NodeId, int], tuple[tuple[NodeId, int], ...]] = {}
    for a in msg.assignments:
        key = (NodeId(a.owner), a.expert)
        shares[key] = (*shares.get(key, ()), (NodeId(a.executor), a.tokens))
    return RoutingPlan(msg.layer, shares, {s.expert: tuple(NodeId(n) for n in s.nodes) for s in msg.splits})


def _plan_from_proto(holder: pb.ForwardRequest | pb.FinishRequest) -> RoutingPlan | None:
    return routing_plan_from_proto(holder.plan) if holder.HasField("plan") else None


def direct_to_proto(routes: Mapping[int, NodeId]) -> list[pb.DirectRoute]:
    """A layer's direct routes (expert index -> executor) as ForwardRequest.direct."""
    return [pb.DirectRoute(expert=e, executor=x) for e, x in sorted(routes.items())]


def direct_from_proto(msgs: Iterable[pb.DirectRoute]) -> dict[int, NodeId]:
    return {m.expert: NodeId(m.executor) for m in msgs}


def forward_to_proto(forward: Forward) -> pb.ForwardRequest:
    plan = None if forward.plan is None else routing_plan_to_proto(forward.plan)
    return pb.ForwardRequest(request_id=forward.request_id, layer=forward.layer, plan=plan, prefetch=forward.prefetch,
                             predict=forward.predict, direct=direct_to_proto(forward.direct))


def forward_from_proto(msg: pb.ForwardRequest) -> Forward:
    return Forward(request_id=msg.request_id, layer=msg.layer, plan=_plan_from_proto(msg),
                   prefetch=tuple(msg.prefetch), predict=msg.predict, direct=direct_from_proto(msg.direct))


def layer_report_to_proto(report: LayerReport) -> pb.ForwardReply:
    return pb.ForwardReply(expert_token_counts=report.counts, resident_experts=sorted(report.resident),
                           loading_experts=sorted(report.loading), attention_seconds=report.attention_s,
                           predicted_counts=report.predicted, resident_total=report.resident_total,
                           next_resident=sorted(report.next_resident), next_loading=sorted(report.next_loading))


def layer_report_from_proto(msg: pb.ForwardReply, node: NodeId) -> LayerReport:
    return LayerReport(node=node, counts=tuple(msg.expert_token_counts), resident=frozenset(msg.resident_experts),
                       loading=frozenset(msg.loading_experts), attention_s=msg.attention_seconds,
                       predicted=tuple(msg.predicted_counts), resident_total=msg.resident_total,
                       next_resident=frozenset(msg.next_resident), next_loading=frozenset(msg.next_loading))


def finish_to_proto(request_id: str, plan: RoutingPlan | None) -> pb.FinishRequest:
    return pb.FinishRequest(request_id=request_id, plan=None if plan is None else routing_plan_to_proto(plan))


def finish_from_proto(msg: pb.FinishRequest) -> tuple[str, RoutingPlan | None]:
    return msg.request_id, _plan_from_proto(msg)


def finish_reply_to_proto(logits: torch.Tensor | None, positions: Sequence[int]) -> pb.FinishReply:
    """Logits [n, V] of the positions they belong to; None: this agent has none (no positions)."""
    if logits is None:
        return pb.FinishReply()
    reply = pb.FinishReply(positions=positions)
    tensor_into(reply.logits, logits)  # every position's logits can be tens of MB: written in place
    return reply


def finish_reply_from_proto(msg: pb.FinishReply) -> tuple[torch.Tensor | None, list[int]]:
    if not msg.HasField("logits"):
        return None, []
    return tensor_from_proto(msg.logits), list(msg.positions)


def release_to_proto(request_id: str) -> pb.ReleaseRequest:
    return pb.ReleaseRequest(request_id=request_id)


def release_from_proto(msg: pb.ReleaseRequest) -> str:
    return msg.request_id


_COUNTER_NAMES = {  # CacheCounters field -> its name on the wire, where they differ
    "attention_s": "attention_seconds", "compute_overrun_s": "compute_overrun_seconds",
    "early_used": "early_experts_used", "early_dropped": "early_experts_dropped",
    "direct_sent": "direct_experts_sent", "cpu_s": "cpu_seconds", "paced_cpu_s": "paced_cpu_seconds",
    "decode_step_s": "decode_step_seconds", "decode_peer_wait_s": "decode_peer_wait_seconds",
    "decode_read_wait_s": "decode_read_wait_seconds",
}


def cache_counters_to_proto(counters: CacheCounters) -> pb.CacheCounters:
    return pb.CacheCounters(**{_COUNTER_NAMES.get(k, k): v for k, v in asdict(counters).items()})


def cache_counters_from_proto(msg: pb.CacheCounters) -> CacheCounters:
    wire = {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}
    return CacheCounters(**{k: wire[_COUNTER_NAMES.get(k, k)] for k in asdict(CacheCounters())})


def cache_state_to_proto(state: CacheState) -> pb.CacheStateReply:
    return pb.CacheStateReply(counters=cache_counters_to_proto(state.counters), resident=sorted(state.resident),
                              loading=sorted(state.loading), placed=sorted(state.placed),
                              slices=[pb.SliceRef(expert=e, part=p, of=o) for e, p, o in sorted(state.slices)],
                              expert_read_s=state.expert_read_s, round_trip_s=state.round_trip_s)


def cache_state_from_proto(msg: pb.CacheStateReply) -> CacheState:
    return CacheState(counters=cache_counters_from_proto(msg.counters), resident=frozenset(msg.resident),
                      loading=frozenset(msg.loading), placed=frozenset(msg.placed),
                      slices=frozenset((s.expert, s.part, s.of) for s in msg.slices),
                      expert_read_s=msg.expert_read_s, round_trip_s=msg.round_trip_s)


def fill_to_proto(experts: Sequence[int], evict: Sequence[int] = (), prefetch: bool = False) -> pb.FillRequest:
    """Experts as layer * num_experts + index, in the order to read them; `evict`: cache entries
    to give up first; `prefetch`: read at a prefetch's priority (the decode prefetch)."""
    return pb.FillRequest(experts=experts, evict=evict, prefetch=prefetch)


def fill_from_proto(msg: pb.FillRequest) -> tuple[list[int], list[int], bool]:
    """(experts to read, in order; cache entries to give up first; at a prefetch's priority)."""
    return list(msg.experts), list(msg.evict), msg.prefetch


def fill_reply_to_proto(accepted: Sequence[int], evicted: Sequence[int] = ()) -> pb.FillReply:
    return pb.FillReply(accepted=accepted, evicted=evicted)


def fill_reply_from_proto(msg: pb.FillReply) -> tuple[list[int], list[int]]:
    """(experts accepted, cache entries given up)."""
    return list(msg.accepted), list(msg.evicted)


def placement_to_proto(experts: Sequence[int], sources: Sequence[tuple[int, str, str]] = ()) -> pb.PlacementRequest:
    """Experts as layer * num_experts + index; sources: (expert, holder, its address) of those to
    fetch from a peer."""
    return pb.PlacementRequest(experts=sorted(experts), sources=[pb.ExpertSource(expert=e, holder=h, address=a)
                                                                 for e, h, a in sources])


def placement_from_proto(msg: pb.PlacementRequest) -> tuple[list[int], list[tuple[int, str, str]]]:
    return list(msg.experts), [(s.expert, s.holder, s.address) for s in msg.sources]


def placement_reply_to_proto(placed: int, resident: int) -> pb.PlacementReply:
    return pb.PlacementReply(placed=placed, resident=resident)


def placement_reply_from_proto(msg: pb.PlacementReply) -> tuple[int, int]:
    """(experts placed, of them resident now)."""
    return msg.placed, msg.resident


# Decode (scheduler -> home agent) -------------------------------------------------------------


def routing_table_to_proto(table: RoutingTable, num_experts: int) -> pb.RoutingTable:
    return pb.RoutingTable(
        version=table.version,
        agents=[pb.AgentAddress(name=n, address=a, data_address=table.data_addresses.get(n, ""))
                for n, a in sorted(table.addresses.items())],
        experts=[pb.ExpertHolders(expert=expert_to_wire(e, num_experts), holders=list(h))
                 for e, h in sorted(table.holders.items()) if h],
        expert_split=_SPLIT_TO_WIRE[table.expert_split], no_decode_prefetch=not table.decode_prefetch,
        runs=[pb.ExpertRun(expert=expert_to_wire(e, num_experts), nodes=list(n))
              for e, n in sorted(table.runs.items())],
        no_load_balance=not table.load_balance,
    )


def routing_table_from_proto(msg: pb.RoutingTable, num_experts: int) -> RoutingTable:
    return RoutingTable(
        version=msg.version,
        addresses={NodeId(a.name): a.address for a in msg.agents},
        data_addresses={NodeId(a.name): a.data_address for a in msg.agents if a.data_address},
        holders={expert_from_wire(x.expert, num_experts): tuple(NodeId(h) for h in x.holders) for x in msg.experts},
        expert_split=_SPLIT_FROM_WIRE.get(msg.expert_split, "auto"), decode_prefetch=not msg.no_decode_prefetch,
        runs={expert_from_wire(x.expert, num_experts): tuple(NodeId(n) for n in x.nodes) for x in msg.runs},
        load_balance=not msg.no_load_balance,
    )


_SPLIT_TO_WIRE: dict[ExpertSplit, pb.ExpertSplit] = {
    "auto": pb.EXPERT_SPLIT_AUTO, "never": pb.EXPERT_SPLIT_NEVER, "always": pb.EXPERT_SPLIT_ALWAYS}
_SPLIT_FROM_WIRE = {v: k for k, v in _SPLIT_TO_WIRE.items()}  # UNSPECIFIED (an older scheduler): auto


def sampling_to_proto(p: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed,
                             stop_token_ids=sorted(p.stop_token_ids), logprobs=p.logprobs, top_logprobs=p.top_logprobs)


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """ValueError for parameters no server sends (the agent samples with them)."""
    if not (msg.temperature >= 0 and 0 < msg.top_p <= 1 and 0 <= msg.top_logprobs <= 20 and msg.max_tokens >= 1):
        raise ValueError(f"sampling parameters out of range: temperature {msg.temperature} (>= 0), top_p {msg.top_p} "
                         f"(0, 1], top_logprobs {msg.top_logprobs} (0..20), max_tokens {msg.max_tokens} (>= 1)")
    return SamplingParams(max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p,
                          seed=msg.seed if msg.HasField("seed") else None, stop_token_ids=frozenset(msg.stop_token_ids),
                          logprobs=msg.logprobs, top_logprobs=msg.top_logprobs)


def adopt_kv_to_proto(adopt: AdoptKV) -> pb.AdoptKVRequest:
    return pb.AdoptKVRequest(request_id=adopt.request_id, capacity=adopt.capacity, prompt_tokens=adopt.prompt_tokens,
                             sources=[pb.AgentAddress(name=n, address=a) for n, a in adopt.sources],
                             prefill_here=adopt.prefill_here, sampling=sampling_to_proto(adopt.sampling),
                             sampled=adopt.sampled, prompt_counts=adopt.prompt_counts)


def adopt_kv_from_proto(msg: pb.AdoptKVRequest) -> AdoptKV:
    return AdoptKV(request_id=msg.request_id, capacity=msg.capacity, prompt_tokens=msg.prompt_tokens,
                   sources=tuple((NodeId(a.name), a.address) for a in msg.sources), prefill_here=msg.prefill_here,
                   sampling=sampling_from_proto(msg.sampling), sampled=msg.sampled,
                   prompt_counts=tuple(msg.prompt_counts))


def adopt_kv_reply_to_proto(local_tokens: int) -> pb.AdoptKVReply:
    return pb.AdoptKVReply(local_tokens=local_tokens)


def adopt_kv_reply_from_proto(msg: pb.AdoptKVReply) -> int:
    return msg.local_tokens


def decode_step_to_proto(spans: Sequence[DecodeSpan], logits: bool = False) -> pb.DecodeStepRequest:
    return pb.DecodeStepRequest(spans=[pb.DecodeSpan(request_id=s.request_id, position=s.position,
                                                     token_ids=s.token_ids) for s in spans], logits=logits)


def decode_step_from_proto(msg: pb.DecodeStepRequest) -> tuple[list[DecodeSpan], bool]:
    """The step's spans, and whether it should return their logits."""
    spans = [DecodeSpan(request_id=RequestId(s.request_id), token_ids=tuple(s.token_ids), position=s.position)
             for s in msg.spans]
    return spans, msg.logits


def _token_to_proto(t: TokenEvent | None) -> pb.SampledToken:
    if t is None:
        return pb.SampledToken(sampled=False)
    return pb.SampledToken(sampled=True, token_id=t.token_id, logprob=t.logprob, is_stop=t.is_stop,
                           top_ids=[i for i, _ in t.top_logprobs], top_logprobs=[lp for _, lp in t.top_logprobs])


def _token_from_proto(msg: pb.SampledToken) -> TokenEvent | None:
    if not msg.sampled:
        return None
    if len(msg.top_ids) != len(msg.top_logprobs):
        raise ValueError(f"{len(msg.top_ids)} top ids with {len(msg.top_logprobs)} logprobs")
    return TokenEvent(token_id=msg.token_id, logprob=msg.logprob if msg.HasField("logprob") else None,
                      top_logprobs=tuple(zip(msg.top_ids, msg.top_logprobs)), is_stop=msg.is_stop)


def decode_step_reply_to_proto(result: DecodeResult) -> pb.DecodeStepReply:
    return pb.DecodeStepReply(tokens=[_token_to_proto(t) for t in result.tokens], round_trips=result.round_trips,
                              gathered=result.gathered,
                              logits=None if result.logits is None else tensor_to_proto(result.logits),
                              selections=None if result.selections is None else tensor_to_proto(result.selections))


def decode_step_reply_from_proto(msg: pb.DecodeStepReply) -> DecodeResult:
    return DecodeResult(tokens=tuple(_token_from_proto(t) for t in msg.tokens), round_trips=msg.round_trips,
                        gathered=tuple(RequestId(r) for r in msg.gathered),
                        logits=tensor_from_proto(msg.logits) if msg.HasField("logits") else None,
                        selections=tensor_from_proto(msg.selections) if msg.HasField("selections") else None)
