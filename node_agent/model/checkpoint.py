"""Where each tensor of a safetensors checkpoint lies on disk, and reading it byte-exactly.

Works on a single `model.safetensors` and on sharded checkpoints with `model.safetensors.index.json`
(how Mixtral-8x7B and Qwen3-30B-A3B are published). Tensors are read with `os.pread` in chunks so
a caller can pace every byte (the expert store's disk throttle); nothing is memory-mapped behind
the throttle's back.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
}
READ_CHUNK = 1 << 20  # bytes per pread; the unit at which a throttle paces reads


@dataclass(frozen=True)
class TensorLocation:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class Checkpoint:
    """The tensor directory of a checkpoint folder (headers only; no weights are read here)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.model_dir / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {self.model_dir}")
        self.locations: dict[str, TensorLocation] = {}
        for name in files:
            self.locations.update(_read_header(self.model_dir / name))

    def __contains__(self, name: str) -> bool:
        return name in self.locations

    def nbytes(self, names: Iterable[str]) -> int:
        return sum(self.locations[n].nbytes for n in names)

    def read(self, name: str, before_chunk: Callable[[int], None] | None = None) -> torch.Tensor:
        """Read one tensor; `before_chunk(nbytes)` is called before every chunk is read."""
        loc = self._location(name)
        return self._read_runs(name, loc, [(loc.start, loc.nbytes)], before_chunk).view(loc.dtype).reshape(loc.shape)

    def read_block(self, name: str, rows: tuple[int, int], cols: tuple[int, int] | None = None,
                   before_chunk: Callable[[int], None] | None = None) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor, and of those only the columns [start, stop) when
        `cols` is given: only those bytes are read (row after row for a column block), in
        chunks of at most READ_CHUNK, `before_chunk(nbytes)` before each."""
        loc = self._location(name)
        if len(loc.shape) != 2:
            raise ValueError(f"tensor {name!r} has shape {list(loc.shape)}; a block is read from a 2-D tensor")
        (r0, r1), (c0, c1) = rows, cols or (0, loc.shape[1])
        if not (0 <= r0 <= r1 <= loc.shape[0] and 0 <= c0 <= c1 <= loc.shape[1]):
            raise ValueError(f"block rows {rows}, columns {cols} of {name!r} outside its shape {list(loc.shape)}")
        item = torch.empty((), dtype=loc.dtype).element_size()
        row_bytes, width = loc.shape[1] * item, (c1 - c0) * item
        # (file offset, bytes) of each contiguous run: the whole block, or one per row
        runs = ([(loc.start + r0 * row_bytes, (r1 - r0) * row_bytes)] if width == row_bytes
                else [(loc.start + r * row_bytes + c0 * item, width) for r in range(r0, r1)])
        return self._read_runs(name, loc, runs, before_chunk).view(loc.dtype).reshape(r1 - r0, c1 - c0)

    def _location(self, name: str) -> TensorLocation:
        loc = self.locations.get(name)
        if loc is None:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.model_dir}")
        return loc

    @staticmethod
    def _read_runs(name: str, loc: TensorLocation, runs: Sequence[tuple[int, int]],
                   before_chunk: Callable[[int], None] | None) -> torch.Tensor:
        """The bytes of `runs` ((file offset, size) each) of `loc`'s file, one after the other,
        into one buffer; `before_chunk(nbytes)` before every READ_CHUNK of them (runs shorter
        than a chunk share one)."""
        # torch's allocator aligns for its kernels; a bytearray would not be (2-3x slower matmuls).
        buf = torch.empty(sum(size for _, size in runs), dtype=torch.uint8)
        view = memoryview(buf.numpy())  # type: ignore[arg-type]
        fd = os.open(loc.file, os.O_RDONLY)
        try:
            done, pending = 0, 0  # bytes read; bytes read since the last before_chunk
            for offset, size in runs:
                at = 0
                while at < size:
                    n = min(READ_CHUNK - pending, size - at)
                    if pending == 0 and before_chunk is not None:
                        before_chunk(min(READ_CHUNK, len(view) - done))
                    got = os.preadv(fd, [view[done : done + n]], offset + at)
                    if got <= 0:
                        raise OSError(f"short read of {name!r} in {loc.file}")
                    at, done, pending = at + got, done + got, (pending + got) % READ_CHUNK
        finally:
            os.close(fd)
        return buf


def _read_header(path: Path) -> dict[str, TensorLocation]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    base = 8 + size
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        begin, end = meta["data_offsets"]
        out[name] = TensorLocation(path, DTYPES[meta["dtype"]], tuple(meta["shape"]), base + begin, end - begin)
    return out
