"""Tensors (raw little-endian bytes + dtype + shape, never pickle) and flat expert ids."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

from protos.ids import ExpertId
from protos.potluck.v1 import agent_pb2 as pb


_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in _DTYPES.items()}


def tensor_nbytes(msg: pb.Tensor) -> int:
    """The bytes a tensor message carries, from its dtype and shape: reading `data` to measure
    it would copy it out of the message (18 ms for 32 MB on this project's host). A malformed
    message counts as its shape says; `tensor_from_proto` refuses it."""
    n = _ITEMSIZE.get(msg.dtype, 1)
    for d in msg.shape:
        n *= d
    return n


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    """Raw little-endian bytes + dtype + shape. Never pickle."""
    return tensor_into(pb.Tensor(), t)


def tensor_into(msg: pb.Tensor, t: torch.Tensor) -> pb.Tensor:
    """`tensor_to_proto` written into a message's own Tensor field (returned): a Tensor built
    apart and passed to its parent's constructor is copied again, 52 ms for 32 MB of logits on
    this project's host."""
    if t.dtype not in _NAMES:
        raise TypeError(f"dtype {t.dtype} cannot go on the wire (supported: {sorted(_DTYPES)})")
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    msg.data, msg.dtype = raw.numpy().tobytes(), _NAMES[t.dtype]
    msg.shape[:] = list(t.shape)
    return msg


# Tensors up to this size are copied into a bytearray (writable, so torch wraps it without a
# warning to silence); larger ones into memory torch allocates.
_SMALL_TENSOR_BYTES = 1 << 16


def tensor_from_proto(msg: pb.Tensor) -> torch.Tensor:
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise ValueError(f"unknown wire dtype {msg.dtype!r}")
    shape = tuple(msg.shape)
    expected = dtype.itemsize * (torch.Size(shape).numel() if shape else 1)
    data = msg.data  # read once: each read of a bytes field copies it out of the message
    if len(data) != expected:
        raise ValueError(f"tensor bytes {len(data)} do not match dtype {msg.dtype} and shape {list(shape)} ({expected} bytes)")
    if not expected:
        return torch.empty(shape, dtype=dtype)
    if expected <= _SMALL_TENSOR_BYTES:  # a decode row: 4 us through a bytearray, 18 us as below
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
    # One copy into memory torch allocated (aligned for its kernels, and writable): 13 ms for
    # 32 MB on this project's host, against 55 ms reading the field twice through numpy.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the bytes are read-only: only the clone is used
        out = torch.frombuffer(data, dtype=torch.uint8).clone()
    return out.view(dtype).reshape(shape)


def expert_to_wire(eid: ExpertId, num_experts: int) -> int:
    """An expert as the wire's flat id: layer * num_experts + index."""
    return eid.layer * num_experts + eid.index


def expert_from_wire(flat: int, num_experts: int) -> ExpertId:
    layer, index = divmod(flat, num_experts)
    return ExpertId(layer, index)


def experts_from_wire(flats: Iterable[int], num_experts: int) -> frozenset[ExpertId]:
    """`expert_from_wire` of each flat id (an agent's holdings as its snapshot lists them)."""
    return frozenset(expert_from_wire(i, num_experts) for i in flats)
