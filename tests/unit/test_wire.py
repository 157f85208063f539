"""Conversion between Python values and wire messages round-trips exactly: every pair in
protos/convert.py, through bytes (`FromString(SerializeToString())`), as the wire carries it."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import pytest
import torch
from google.protobuf.message import Message

from protos import convert as c
from protos.ids import ExpertId, NodeId, RequestId, SliceId
from protos.messages import (AdoptKV, AgentInfo, BeginStep, CacheCounters, CacheState, DecodeResult, DecodeSpan, ExpertBatch,
                             Forward, KVBlock, LayerReport, Peer, RoutingPlan, SamplingParams, StepBegun, TokenEvent)
from protos.potluck.v1 import agent_pb2 as pb
from protos.routing import EXPERT_SPLITS, RoutingTable

M = TypeVar("M", bound=Message)
A, B = NodeId("a"), NodeId("b")


def wire(msg: M) -> M:
    """The message as the other end parses it."""
    return type(msg).FromString(msg.SerializeToString())


def same(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


@pytest.mark.parametrize(
    "t",
    [torch.randn(3, 4), torch.randn(2, 3, 5).bfloat16(), torch.randn(4).half(), torch.tensor(5), torch.zeros(0, 4),
     torch.arange(6).view(2, 3).int(), torch.arange(6), torch.tensor([[-1, 7], [300, 2]], dtype=torch.int16)],
)
def test_tensor_round_trip(t: torch.Tensor) -> None:
    assert same(c.tensor_from_proto(wire(c.tensor_to_proto(t))), t)


def test_non_contiguous_tensor_is_sent_in_logical_order() -> None:
    t = torch.arange(12.0).view(3, 4).t()
    assert torch.equal(c.tensor_from_proto(c.tensor_to_proto(t)), t)


def test_malformed_tensor_is_refused() -> None:
    with pytest.raises(ValueError, match="do not match"):
        c.tensor_from_proto(pb.Tensor(data=b"\0" * 10, dtype="float32", shape=[3]))
    with pytest.raises(ValueError, match="unknown wire dtype"):
        c.tensor_from_proto(pb.Tensor(data=b"", dtype="complex64", shape=[0]))


def test_expert_id_round_trip() -> None:
    ids = [ExpertId(layer, index) for layer in range(3) for index in range(8)]
    flat = [c.expert_to_wire(e, 8) for e in ids]
    assert flat == list(range(24))  # layer * num_experts + index, what every flat id field says
    assert [c.expert_from_wire(i, 8) for i in flat] == ids


# Control plane ---------------------------------------------------------------------------------


def test_info_round_trip() -> None:
    info = AgentInfo(name=A, model_type="qwen3_moe", num_layers=4, num_experts=8, vocab_size=512, fingerprint="f00d",
                     expert_bytes=4096, memory_bytes=1 << 20, disk_bytes_per_s=5e7, link_bytes_per_s=1.25e8,
                     max_positions=2048, dense_layers=frozenset({0, 3}), flops_per_s=2.5e9, hidden_size=64,
                     dtype_bytes=4, link_latency_s=0.001, data_port=40123, compute_share=0.5)
    assert c.info_from_proto(wire(c.info_to_proto(info))) == info


def test_begin_step_round_trip() -> None:
    begin = BeginStep(request_id="r", step=2, token_ids=(5, 6, 7), positions=(10, 11, 12),
                      peers=(Peer(A, "h:1", 10, 12, 4), Peer(B, "h:2", -1, -1, 9)), all_logits=True, predict=True,
                      holdings=True)
    assert c.begin_step_from_proto(wire(c.begin_step_to_proto(begin))) == begin
    assert c.step_peer_from_proto(wire(c.step_peer_to_proto(begin.peers[1]))) == begin.peers[1]


@pytest.mark.parametrize("begun", [
    StepBegun(LayerReport(A, (), frozenset(), frozenset(), predicted=(0, 3, 1), resident_total=5,
                          next_resident=frozenset({1}), next_loading=frozenset({2})), frozenset({0, 9, 17})),
    StepBegun(LayerReport(B, (), frozenset(), frozenset())),  # no prediction asked, no holdings
])
def test_step_begun_round_trip(begun: StepBegun) -> None:
    assert c.step_begun_from_proto(wire(c.step_begun_to_proto(begun)), begun.report.node) == begun


def test_routing_plan_round_trip() -> None:
    plan = RoutingPlan(4, {(A, 3): ((B, 0),), (B, 0): ((A, 5), (B, 0))})
    assert c.routing_plan_from_proto(wire(c.routing_plan_to_proto(plan))) == plan
    split = RoutingPlan(4, {(A, 3): ((B, 0),)}, {6: (B, A), 2: (A, B)})  # slice i of expert 6 on (B, A)[i]
    back = c.routing_plan_from_proto(wire(c.routing_plan_to_proto(split)))
    assert back == split and back.splits[6] == (B, A) and back.executors(6) == {A, B}


def test_direct_routes_round_trip() -> None:
    routes = {7: B, 0: A, 3: B}
    msg = pb.ForwardRequest(direct=c.direct_to_proto(routes))
    assert c.direct_from_proto(wire(msg).direct) == routes
    assert [d.expert for d in msg.direct] == [0, 3, 7]  # one order for the same routes
    assert c.direct_from_proto(pb.ForwardRequest().direct) == {}


@pytest.mark.parametrize("forward", [
    Forward(request_id="r", layer=3, plan=RoutingPlan(2, {(A, 1): ((B, 0),)}), prefetch=(4, 6), predict=True,
            direct={5: B}),
    Forward(request_id="r", layer=0, plan=None),  # layer 0: no plan yet
    Forward(request_id="r", layer=1, plan=RoutingPlan(0, {})),  # a plan that moves nothing is still a plan
])
def test_forward_round_trip(forward: Forward) -> None:
    assert c.forward_from_proto(wire(c.forward_to_proto(forward))) == forward


@pytest.mark.parametrize("report", [
    LayerReport(A, (3, 0, 1), frozenset({0, 2}), frozenset({1}), attention_s=0.25, predicted=(1, 1, 2),
                resident_total=7, next_resident=frozenset({2}), next_loading=frozenset({0})),
    LayerReport(B, (), frozenset(), frozenset()),  # a dense-MLP layer
])
def test_layer_report_round_trip(report: LayerReport) -> None:
    assert c.layer_report_from_proto(wire(c.layer_report_to_proto(report)), report.node) == report


@pytest.mark.parametrize("plan", [RoutingPlan(5, {(A, 0): ((A, 2), (B, 0))}), None])
def test_finish_round_trip(plan: RoutingPlan | None) -> None:
    assert c.finish_from_proto(wire(c.finish_to_proto("r", plan))) == ("r", plan)


def test_finish_reply_round_trip() -> None:
    logits = torch.randn(2, 11)
    back, positions = c.finish_reply_from_proto(wire(c.finish_reply_to_proto(logits, [7, 9])))
    assert back is not None and same(back, logits) and positions == [7, 9]
    assert c.finish_reply_from_proto(wire(c.finish_reply_to_proto(None, []))) == (None, [])


def test_release_round_trip() -> None:
    assert c.release_from_proto(wire(c.release_to_proto("r"))) == "r"


def test_cache_state_round_trip() -> None:
    # Distinct values, so that a counter that lands in another's field is caught.
    counters = CacheCounters(**{name: i + 1 for i, name in enumerate(CacheCounters.__dataclass_fields__)})
    assert counters.attention_s == 9 and counters.requests == 29
    state = CacheState(counters, frozenset({1, 4, 8}), frozenset({2}), placed=frozenset({4, 8}),
                       slices=frozenset({(3, 0, 2), (3, 1, 2), (5, 2, 4)}), expert_read_s=0.025, round_trip_s=0.003)
    assert c.cache_state_from_proto(wire(c.cache_state_to_proto(state))) == state
    assert c.cache_counters_from_proto(wire(c.cache_counters_to_proto(counters))) == counters
    assert wire(c.cache_counters_to_proto(counters)).decode_remote_experts == counters.decode_remote_experts


def test_fill_round_trip() -> None:
    assert c.fill_from_proto(wire(c.fill_to_proto([9, 3, 4]))) == ([9, 3, 4], [], False)  # the order to read them
    assert c.fill_from_proto(wire(c.fill_to_proto([9], evict=[5, 2], prefetch=True))) == ([9], [5, 2], True)
    assert c.fill_reply_from_proto(wire(c.fill_reply_to_proto([3, 9]))) == ([3, 9], [])
    assert c.fill_reply_from_proto(wire(c.fill_reply_to_proto([3], evicted=[5]))) == ([3], [5])


def test_placement_round_trip() -> None:
    assert c.placement_from_proto(wire(c.placement_to_proto([9, 3, 4]))) == ([3, 4, 9], [])
    sources = [(3, "laptop", "192.168.1.20:50051"), (9, "pi", "[::1]:7")]
    assert c.placement_from_proto(wire(c.placement_to_proto([9, 3, 4], sources))) == ([3, 4, 9], sources)
    assert c.placement_reply_from_proto(wire(c.placement_reply_to_proto(3, 1))) == (3, 1)


# Decode ----------------------------------------------------------------------------------------


def test_routing_table_round_trip() -> None:
    table = RoutingTable(version=3, addresses={A: "h:1", B: "h:2"}, data_addresses={B: "h:9"},
                         holders={ExpertId(1, 2): (B, A), ExpertId(0, 0): (A,)},
                         runs={ExpertId(1, 3): (B, A), ExpertId(2, 7): (A,)})
    assert c.routing_table_from_proto(wire(c.routing_table_to_proto(table, 8)), 8) == table
    unbalanced = RoutingTable(version=5, load_balance=False)
    assert c.routing_table_from_proto(wire(c.routing_table_to_proto(unbalanced, 8)), 8) == unbalanced
    for split in EXPERT_SPLITS:
        table = RoutingTable(version=4, expert_split=split, decode_prefetch=split != "auto")
        assert c.routing_table_from_proto(wire(c.routing_table_to_proto(table, 8)), 8) == table
    unset = c.routing_table_from_proto(pb.RoutingTable(version=1), 8)
    assert unset.expert_split == "auto" and unset.load_balance  # unset: the defaults


def test_adopt_kv_round_trip() -> None:
    adopt = AdoptKV(request_id="r", capacity=40, prompt_tokens=30, sources=((A, "h:1"), (B, "h:2")),
                    prompt_counts=(3, 0, 7, 1))
    assert c.adopt_kv_from_proto(wire(c.adopt_kv_to_proto(adopt))) == adopt
    sampling = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.75, seed=0, stop_token_ids=frozenset({2, 9}),
                              logprobs=True, top_logprobs=3)
    here = AdoptKV(request_id="r", capacity=40, prompt_tokens=30, sources=(), prefill_here=True, sampling=sampling,
                   sampled=5)
    assert c.adopt_kv_from_proto(wire(c.adopt_kv_to_proto(here))) == here
    assert c.adopt_kv_reply_from_proto(wire(c.adopt_kv_reply_to_proto(12))) == 12


def test_sampling_params_round_trip() -> None:
    for p in (SamplingParams(max_tokens=1), SamplingParams(max_tokens=3, temperature=0, seed=12345678901)):
        assert c.sampling_from_proto(wire(c.sampling_to_proto(p))) == p
    for bad in (SamplingParams(max_tokens=1, temperature=-1), SamplingParams(max_tokens=1, top_p=0),
                SamplingParams(max_tokens=1, top_logprobs=21), SamplingParams(max_tokens=0)):
        with pytest.raises(ValueError, match="out of range"):
            c.sampling_from_proto(wire(c.sampling_to_proto(bad)))


def test_decode_step_round_trip() -> None:
    spans = [DecodeSpan(request_id=RequestId("r1"), token_ids=(5,), position=30),
             DecodeSpan(request_id=RequestId("r2"), token_ids=(0, 9, 4), position=0),
             DecodeSpan(request_id=RequestId("r3"), token_ids=(), position=8)]  # follows the home's sample
    assert c.decode_step_from_proto(wire(c.decode_step_to_proto(spans))) == (spans, False)
    assert c.decode_step_from_proto(wire(c.decode_step_to_proto(spans, logits=True))) == (spans, True)
    tokens = (TokenEvent(token_id=4, logprob=-0.5, top_logprobs=((4, -0.5), (1, -2.25)), is_stop=True), None,
              TokenEvent(token_id=0))
    chosen = torch.tensor([[[3, 1], [0, 2], [3, 0], [1, 2], [2, 3]]] * 2, dtype=torch.int16)  # [layers, T, k]
    result = DecodeResult(tokens=tokens, round_trips=3, gathered=("r2",), logits=torch.randn(3, 11), selections=chosen)
    back = c.decode_step_reply_from_proto(wire(c.decode_step_reply_to_proto(result)))
    assert back.logits is not None and result.logits is not None and same(back.logits, result.logits)
    assert back.selections is not None and same(back.selections, chosen)
    assert (back.tokens, back.round_trips, back.gathered) == (tokens, 3, ("r2",))
    bare = c.decode_step_reply_from_proto(wire(c.decode_step_reply_to_proto(DecodeResult(tokens=(), round_trips=0))))
    assert bare.logits is None and bare.selections is None and bare.tokens == ()


# Peer plane ------------------------------------------------------------------------------------


def test_kv_block_round_trip() -> None:
    block = KVBlock(request_id="r", step=1, layer=2, sender=A, keys=torch.randn(3, 2, 4), values=torch.randn(3, 2, 4),
                    positions=torch.tensor([4, 9, 12]), chunk=1, num_chunks=3)
    back = c.kv_block_from_proto(wire(c.kv_block_to_proto(block)))
    assert (back.request_id, back.step, back.layer, back.sender, back.chunk, back.num_chunks) == ("r", 1, 2, A, 1, 3)
    assert same(back.keys, block.keys) and same(back.values, block.values) and same(back.positions, block.positions)


def test_kv_block_with_rows_that_disagree_is_refused() -> None:
    msg = c.kv_block_to_proto(KVBlock(request_id="r", step=0, layer=0, sender=A, keys=torch.zeros(3, 2, 4),
                                      values=torch.zeros(3, 2, 4), positions=torch.arange(2)))
    with pytest.raises(ValueError, match="shapes disagree"):
        c.kv_block_from_proto(msg)


def test_fetch_expert_round_trip() -> None:
    assert c.fetch_expert_from_proto(wire(c.fetch_expert_to_proto(3, 7, 2))) == (3, 7, 2)
    gate, up, down = torch.randn(4, 6), torch.randn(4, 6), torch.randn(6, 4).bfloat16()
    g, u, d, chunk, chunks = c.expert_part_from_proto(wire(c.expert_part_to_proto(gate, up, down, 1, 3)))
    assert same(g, gate) and same(u, up) and same(d, down) and (chunk, chunks) == (1, 3)


def test_attend_round_trip() -> None:
    q = torch.randn(3, 4, 8)
    request_id, layer, back = c.attend_from_proto(wire(c.attend_to_proto("r", 2, q)))
    assert (request_id, layer) == ("r", 2) and same(back, q)
    out, lse = torch.randn(3, 4, 8), torch.randn(3, 4)
    back_out, back_lse = c.attend_reply_from_proto(wire(c.attend_reply_to_proto(out, lse)))
    assert same(back_out, out) and same(back_lse, lse)


def test_expert_batch_round_trip() -> None:
    batch = ExpertBatch(request_id="r", layer=3, hidden=torch.randn(2, 8), expert_ids=torch.tensor([[0, -1], [5, 2]]),
                        weights=torch.rand(2, 2), decode=True)
    back = c.expert_batch_from_proto(wire(c.expert_batch_to_proto(batch)))
    assert (back.request_id, back.layer, back.decode) == ("r", 3, True)
    assert same(back.hidden, batch.hidden) and same(back.expert_ids, batch.expert_ids)
    assert same(back.weights, batch.weights)
    assert c.expert_batch_to_proto(batch).expert_ids.dtype == "int32"  # ids travel narrow
    assert (back.part, back.of) == (0, 1)  # whole experts
    sliced = c.expert_batch_from_proto(wire(c.expert_batch_to_proto(dataclasses.replace(batch, part=2, of=3))))
    assert (sliced.part, sliced.of) == (2, 3) and back.read_ahead == ()
    ahead = (SliceId(ExpertId(4, 1), 2, 3), SliceId(ExpertId(4, 7), 0, 2))
    hinted = c.expert_batch_from_proto(wire(c.expert_batch_to_proto(dataclasses.replace(batch, read_ahead=ahead))))
    assert hinted.read_ahead == ahead
    bad = c.expert_batch_to_proto(batch)
    bad.read_ahead.add(layer=4, expert=1, part=3, of=3)
    with pytest.raises(ValueError, match="slice 3 of 3"):
        c.expert_batch_from_proto(bad)
    out = torch.randn(2, 8)
    assert same(c.expert_result_from_proto(wire(c.expert_result_to_proto(out))), out)


def test_fetch_kv_round_trip() -> None:
    assert c.fetch_kv_from_proto(wire(c.fetch_kv_to_proto("r", 4, 2))) == ("r", 4, 2)


@pytest.mark.parametrize("body", [
    pb.ExpertBatch(request_id="decode", layer=1), pb.ExpertResult(output=c.tensor_to_proto(torch.ones(1, 2))),
    "agent b: ValueError: no such expert",
])
def test_peer_frame_round_trip(body: c.FrameBody) -> None:
    assert c.peer_frame_from_proto(wire(c.peer_frame_to_proto(7, body))) == (7, body)


def test_a_peer_frame_without_a_body_is_refused() -> None:
    with pytest.raises(ValueError, match="no body"):
        c.peer_frame_from_proto(pb.PeerFrame(call=3))


def test_failed_agent_metadata_round_trip() -> None:
    metadata = c.failed_agent_to_metadata("b", "h:2")
    assert c.failed_agent_from_metadata([("other", "x"), *metadata]) == ("b", "h:2")
    assert c.failed_agent_from_metadata(()) is None and c.failed_agent_from_metadata(None) is None
