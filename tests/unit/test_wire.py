"""Conversion between Python values and wire messages round-trips exactly."""

from __future__ import annotations

import pytest
import torch

from protos.convert import direct_from_proto, direct_to_proto, expert_from_wire, expert_to_wire, tensor_from_proto, tensor_to_proto
from protos.ids import ExpertId
from protos.potluck.v1 import agent_pb2 as pb
from scheduler.client import plan_from_proto, plan_to_proto
from scheduler.types import NodeId, RoutingPlan


@pytest.mark.parametrize(
    "t",
    [torch.randn(3, 4), torch.randn(2, 3, 5).bfloat16(), torch.randn(4).half(), torch.tensor(5), torch.zeros(0, 4),
     torch.arange(6).view(2, 3).int(), torch.arange(6)],
)
def test_tensor_round_trip(t: torch.Tensor) -> None:
    msg = tensor_to_proto(t)
    back = tensor_from_proto(pb.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)


def test_non_contiguous_tensor_is_sent_in_logical_order() -> None:
    t = torch.arange(12.0).view(3, 4).t()
    assert torch.equal(tensor_from_proto(tensor_to_proto(t)), t)


def test_malformed_tensor_is_refused() -> None:
    with pytest.raises(ValueError, match="do not match"):
        tensor_from_proto(pb.Tensor(data=b"\0" * 10, dtype="float32", shape=[3]))
    with pytest.raises(ValueError, match="unknown wire dtype"):
        tensor_from_proto(pb.Tensor(data=b"", dtype="complex64", shape=[0]))


def test_routing_plan_round_trip() -> None:
    plan = RoutingPlan(4, {(NodeId("a"), 3): ((NodeId("b"), 0),), (NodeId("b"), 0): ((NodeId("a"), 5), (NodeId("b"), 0))})
    msg = plan_to_proto(plan)
    assert msg is not None
    assert plan_from_proto(pb.RoutingPlan.FromString(msg.SerializeToString())) == plan


def test_direct_routes_round_trip() -> None:
    routes = {7: NodeId("b"), 0: NodeId("a"), 3: NodeId("b")}
    msg = pb.ForwardRequest(direct=direct_to_proto(routes))
    assert direct_from_proto(pb.ForwardRequest.FromString(msg.SerializeToString()).direct) == routes
    assert [d.expert for d in msg.direct] == [0, 3, 7]  # one order for the same routes
    assert direct_from_proto(pb.ForwardRequest().direct) == {}


def test_expert_id_round_trip() -> None:
    ids = [ExpertId(layer, index) for layer in range(3) for index in range(8)]
    flat = [expert_to_wire(e, 8) for e in ids]
    assert flat == list(range(24))  # layer * num_experts + index, what every flat id field says
    assert [expert_from_wire(i, 8) for i in flat] == ids
