"""Identifiers both ends of the wire share (the scheduler and the agents), as distinct types so a
type checker catches a node name passed as a request id, or a bare int passed as an expert."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import NewType

NodeId = NewType("NodeId", str)  # an agent's name, unique in an inventory
RequestId = NewType("RequestId", str)  # one generation request, e.g. "chatcmpl-9f2c..."


@dataclass(frozen=True, order=True)
class ExpertId:
    """One routed expert: (layer, index). Not interchangeable with a plain int."""

    layer: int  # decoder layer, 0-based
    index: int  # expert index within the layer, 0-based


@dataclass(frozen=True, order=True)
class SliceId:
    """Slice `part` of `of` of a routed expert (expert tensor parallelism): the intermediate units
    `units(I)` of its gate and up projections (rows) and of its down projection (columns). A
    slice's output is a partial sum: the expert's output is the sum over its `of` slices."""

    expert: ExpertId
    part: int  # 0 <= part < of
    of: int  # >= 2 (a whole expert is its ExpertId)

    def __post_init__(self) -> None:
        if not (self.of >= 2 and 0 <= self.part < self.of):
            raise ValueError(f"slice {self.part} of {self.of}: need of >= 2 and 0 <= part < of")

    @property
    def layer(self) -> int:
        return self.expert.layer

    @property
    def index(self) -> int:
        return self.expert.index

    def units(self, intermediate: int) -> tuple[int, int]:
        """[start, stop) of the expert's `intermediate` units this slice holds (as even as can be)."""
        return self.part * intermediate // self.of, (self.part + 1) * intermediate // self.of


FINGERPRINT_SAMPLE_BYTES = 64 * 1024  # read from both ends of each weights file's data


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a checkpoint: its config.json, and of each safetensors file its name, size,
    header (every tensor's name, dtype, shape and offsets) and the first and last 64 KiB of its
    data, so that two checkpoints of one shape but other weights (another seed, another fine-tune)
    differ, without reading gigabytes at start. The scheduler refuses an agent whose fingerprint
    differs from its own, so both sides must compute it the same way."""
    folder = Path(model_dir)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            head = f.read(8)
            header = f.read(int.from_bytes(head, "little")) if len(head) == 8 else b""
            digest.update(head + header)
            digest.update(f.read(FINGERPRINT_SAMPLE_BYTES))
            f.seek(max(f.tell(), size - FINGERPRINT_SAMPLE_BYTES))
            digest.update(f.read())
    return digest.hexdigest()[:16]
