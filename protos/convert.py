"""The one place where Python values become wire messages and back (round-trip tested)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy
import torch

from protos.ids import ExpertId, NodeId, RequestId
from protos.routing import RoutingTable
from protos.potluck.v1 import agent_pb2 as pb

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    """Raw little-endian bytes + dtype + shape. Never pickle."""
    if t.dtype not in _NAMES:
        raise TypeError(f"dtype {t.dtype} cannot go on the wire (supported: {sorted(_DTYPES)})")
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    return pb.Tensor(data=raw.numpy().tobytes(), dtype=_NAMES[t.dtype], shape=list(t.shape))


def tensor_from_proto(msg: pb.Tensor) -> torch.Tensor:
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise ValueError(f"unknown wire dtype {msg.dtype!r}")
    shape = tuple(msg.shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = itemsize * (torch.Size(shape).numel() if shape else 1)
    if len(msg.data) != expected:
        raise ValueError(f"tensor bytes {len(msg.data)} do not match dtype {msg.dtype} and shape {list(shape)} ({expected} bytes)")
    # One copy off the wire into memory torch allocated (aligned for its kernels, and writable).
    out = torch.empty(expected, dtype=torch.uint8)
    out.numpy()[:] = numpy.frombuffer(msg.data, dtype=numpy.uint8)
    return out.view(dtype).reshape(shape)


def tensor_nbytes(msg: pb.Tensor) -> int:
    return len(msg.data)


def expert_to_wire(eid: ExpertId, num_experts: int) -> int:
    """An expert as the wire's flat id: layer * num_experts + index."""
    return eid.layer * num_experts + eid.index


def expert_from_wire(flat: int, num_experts: int) -> ExpertId:
    layer, index = divmod(flat, num_experts)
    return ExpertId(layer, index)


def direct_to_proto(routes: Mapping[int, NodeId]) -> list[pb.DirectRoute]:
    """A layer's direct routes (expert index -> executor) as ForwardRequest.direct."""
    return [pb.DirectRoute(expert=e, executor=x) for e, x in sorted(routes.items())]


def direct_from_proto(msgs: Iterable[pb.DirectRoute]) -> dict[int, NodeId]:
    return {m.expert: NodeId(m.executor) for m in msgs}


def routing_table_to_proto(table: RoutingTable, num_experts: int) -> pb.RoutingTable:
    return pb.RoutingTable(
        version=table.version,
        agents=[pb.AgentAddress(name=n, address=a, data_address=table.data_addresses.get(n, ""))
                for n, a in sorted(table.addresses.items())],
        experts=[pb.ExpertHolders(expert=expert_to_wire(e, num_experts), holders=list(h))
                 for e, h in sorted(table.holders.items()) if h],
    )


def routing_table_from_proto(msg: pb.RoutingTable, num_experts: int) -> RoutingTable:
    return RoutingTable(
        version=msg.version,
        addresses={NodeId(a.name): a.address for a in msg.agents},
        data_addresses={NodeId(a.name): a.data_address for a in msg.agents if a.data_address},
        holders={expert_from_wire(x.expert, num_experts): tuple(NodeId(h) for h in x.holders) for x in msg.experts},
    )


DecodeToken = tuple[RequestId, int, int]  # (request, token id, position) of one decode step


def decode_step_to_proto(tokens: Sequence[DecodeToken]) -> pb.DecodeStepRequest:
    return pb.DecodeStepRequest(tokens=[pb.DecodeToken(request_id=r, token_id=t, position=p) for r, t, p in tokens])


def decode_step_from_proto(msg: pb.DecodeStepRequest) -> list[DecodeToken]:
    return [(RequestId(t.request_id), t.token_id, t.position) for t in msg.tokens]


def kv_block_to_proto(request_id: str, layer: int, sender: str, keys: torch.Tensor, values: torch.Tensor,
                      positions: torch.Tensor, step: int = 0, chunk: int = 0, num_chunks: int = 1) -> pb.KVBlock:
    """K/V rows [n, KVH, hd] of one layer at positions [n]."""
    return pb.KVBlock(request_id=request_id, step=step, layer=layer, sender=sender, keys=tensor_to_proto(keys),
                      values=tensor_to_proto(values), positions=positions.tolist(), chunk=chunk,
                      num_chunks=num_chunks)


def kv_block_from_proto(msg: pb.KVBlock) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, values, positions) of a block; ValueError when their rows disagree."""
    keys, values = tensor_from_proto(msg.keys), tensor_from_proto(msg.values)
    positions = torch.tensor(list(msg.positions), dtype=torch.long)
    if keys.dim() != 3 or keys.shape != values.shape or keys.shape[0] != positions.numel():
        raise ValueError(f"K/V block shapes disagree: keys {list(keys.shape)}, values {list(values.shape)}, "
                         f"{positions.numel()} positions")
    return keys, values, positions
