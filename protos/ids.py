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
