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


def model_fingerprint(model_dir: Path) -> str:
    """Identity of a checkpoint's shape (hash of its config.json): the scheduler refuses an agent
    whose fingerprint differs from its own, so both sides must compute it the same way."""
    return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()[:16]
