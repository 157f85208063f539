"""Reads one expert's weights from the checkpoint on local disk, paced by the disk throttle."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig
from node_agent.model.moe import ExpertWeights
from node_agent.throttle import Throttle
from protos.ids import ExpertId, SliceId

log = logging.getLogger(__name__)


class ExpertStore:
    def __init__(self, ckpt: Checkpoint, cfg: MoeConfig, dtype: torch.dtype, disk: Throttle) -> None:
        self.ckpt, self.cfg, self.dtype, self.disk = ckpt, cfg, dtype, disk
        self._lock = threading.Lock()
        self.bytes_read = 0  # bytes read from disk since start (every chunk passed the throttle)
        self.read_s = 0.0  # seconds those reads took (the throttle's pacing included)
        one = cfg.expert_tensor_names(next(i for i in range(cfg.num_layers) if cfg.is_moe(i)), 0)
        # Bytes one expert takes in memory, in the compute dtype (may differ from the file's).
        self.expert_nbytes = sum(
            torch.Size(ckpt.locations[n].shape).numel() for n in one
        ) * torch.empty((), dtype=dtype).element_size()

    def expert_read_s(self) -> float:
        """What reading one expert takes here: as measured so far (a page-cached file reads in no
        time), else as the disk throttle paces it (0 where neither knows)."""
        with self._lock:
            if self.bytes_read:
                return self.expert_nbytes * self.read_s / self.bytes_read
        return self.expert_nbytes / self.disk.rate if self.disk.rate else 0.0

    def _count(self, nbytes: int) -> None:
        self.disk.pace(nbytes)
        with self._lock:
            self.bytes_read += nbytes

    def load(self, key: ExpertId | SliceId, check: Callable[[], None] | None = None) -> ExpertWeights:
        """Blocking read of (gate, up, down), or of a slice's share of them (only its bytes are
        read: rows of gate and up, columns of down); run it in the disk thread, never on the
        event loop. `check` runs before every chunk and may raise to stop the read (nothing is
        kept)."""
        eid = key if isinstance(key, ExpertId) else key.expert
        names = self.cfg.expert_tensor_names(eid.layer, eid.index)

        def before_chunk(nbytes: int) -> None:
            if check is not None:
                check()
            self._count(nbytes)

        start = time.perf_counter()
        try:
            if isinstance(key, SliceId):
                units = key.units(self.cfg.expert_size)
                gate, up = (self.ckpt.read_block(n, units, before_chunk=before_chunk) for n in names[:2])
                down = self.ckpt.read_block(names[2], (0, self.cfg.hidden_size), units, before_chunk=before_chunk)
                tensors = [t.to(self.dtype) for t in (gate, up, down)]
            else:
                tensors = [self.ckpt.read(n, before_chunk=before_chunk).to(self.dtype) for n in names]
        finally:  # a read stopped part-way took its time for the bytes it counted
            with self._lock:
                self.read_s += time.perf_counter() - start
        log.debug("loaded %s", key)
        return ExpertWeights(*tensors)
