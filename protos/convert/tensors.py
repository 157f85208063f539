"""Tensors (raw little-endian bytes + dtype + shape, never pickle) and flat expert ids."""

from __future__ import annotations

import numpy
import torch

from protos.ids import ExpertId
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
