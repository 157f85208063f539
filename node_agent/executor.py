"""The experts an agent runs for tokens other agents (or its own plan) send it: a peer's batch is
checked, resident experts run in the layer's grouped pass (or, for a decode step's few rows, in
one job), and missing ones are read and run as each comes in."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import torch

from node_agent.attention import Compute
from node_agent.expert_buffer import ExpertBuffer
from node_agent.grouped import GroupedPasses
from node_agent.model import slots
from node_agent.model.config import MoeConfig
from node_agent.model.moe import ExpertWeights
from node_agent.read_ahead import MAX_AHEAD, ReadAhead
from protos.ids import ExpertId, SliceId

# A decode batch's experts on the decode step's torch threads (Decoder.mix).
Mix = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Mapping[int, ExpertWeights]], torch.Tensor | None]


# A peer's decode batch of at most this many rows, all resident, runs on the event loop of an
# unpaced agent rather than as a compute job (as a home's one-token steps do, decode.py). A batch's matrix-vector products (2 bench-model experts on one row: 0.28 ms
# alone) cost less than the two thread hops around a job: 0.34 ms of a holder's 1.04 ms per call
# on the emulated-LAN decode bench, 6 calls a token. This departs from keeping the loop free of
# torch work: other messages wait for up to a batch's compute, about what a call's hops cost. A
# paced agent (compute_share) still runs them on the compute thread, where the pacer counts them.
INLINE_ROWS = 8


class ExpertExecutor:
    def __init__(self, cfg: MoeConfig, buffer: ExpertBuffer, passes: GroupedPasses, compute: Compute, mix: Mix,
                 inline: bool = False) -> None:
        self.cfg, self.buffer, self.passes, self.compute, self.mix = cfg, buffer, passes, compute, mix
        self.inline = inline  # decode batches of at most INLINE_ROWS rows run on the event loop
        self.slice_runs = 0  # (layer, expert) slices run (execute_slices)
        self.read_ahead = ReadAhead(buffer)  # slices homes expect to ask for next

    def check_batch(self, layer: int, ids: torch.Tensor, part: int = 0, of: int = 1) -> None:
        """Refuse a peer's expert batch that names a layer without routed experts, an expert the
        model lacks or a slice no expert has (my own router's batches need no check)."""
        if of > 1 and not (of <= self.cfg.expert_size and 0 <= part < of):
            raise ValueError(f"slice {part} of {of}: an expert of {self.cfg.expert_size} units has slices 0..of-1, "
                             f"of at most {self.cfg.expert_size}")
        if not self.cfg.has_experts(layer):
            raise ValueError(f"layer {layer} has no routed experts")
        named = set(ids.flatten().tolist())  # a handful of distinct ints: cheaper than min/max ops
        if named and (min(named) < -1 or max(named) >= self.cfg.num_experts):
            raise ValueError(f"expert ids must be in [0, {self.cfg.num_experts}), or -1 for a skipped slot")

    def check_ahead(self, ahead: Sequence[SliceId]) -> None:
        """Refuse a peer's read-ahead that names more slices than are kept, or a slice the model
        lacks."""
        if len(ahead) > MAX_AHEAD:
            raise ValueError(f"{len(ahead)} slices to read ahead; at most {MAX_AHEAD}")
        for s in ahead:
            if not (self.cfg.has_experts(s.layer) and 0 <= s.index < self.cfg.num_experts
                    and s.of <= self.cfg.expert_size):
                raise ValueError(f"no slice {s.part} of {s.of} of expert {s.index} of layer {s.layer} in this model")

    async def execute(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                      decode: bool = False, ahead: Sequence[SliceId] = ()) -> torch.Tensor:
        """Weighted sum of my experts on tokens sent to me. Resident experts run in one grouped
        pass, shared with the other owners' batches of the layer that arrive meanwhile; missing
        ones are loaded concurrently (the buffer bounds memory) and each runs as soon as it is in,
        so reads overlap compute. A decode step's tokens whose experts are all resident run in
        one job: on a few rows a pass's bookkeeping costs more than sharing saves. The reads of
        `ahead` (a home's guessed slices, sent with a whole batch too) begin behind the batch's
        own reads, or at once where it has none."""
        out = torch.zeros_like(x)
        wanted = [ExpertId(layer, i) for i in sorted(set(ids.flatten().tolist())) if i >= 0]
        ready = set(self.buffer.resident(layer))
        now = [e for e in wanted if e.index in ready]
        later = [e for e in wanted if e.index not in ready]
        held = {e.index: await self.buffer.acquire(e) for e in now}  # resident: no await inside
        if not later:
            await self._begin_ahead(ahead)
        if decode and not later:  # a decode step's few tokens: one job, no pass
            try:
                if self.inline and x.shape[0] <= INLINE_ROWS:
                    with torch.inference_mode():
                        mixed = self.mix(x, ids, weights, held)
                else:
                    mixed = await self.compute(self.mix, x, ids, weights, held)
            finally:
                for e in now:
                    await self.buffer.release(e)
            return out if mixed is None else mixed

        async def one(eid: ExpertId) -> None:
            async with self.buffer.pinned(eid) as w:
                await self.compute(slots.add_experts, out, x, ids, weights, {eid.index: w})

        try:
            tasks = [asyncio.ensure_future(one(e)) for e in later]  # loads start before compute
            if later and ahead:
                await asyncio.sleep(0)  # each load has queued its read first
                await self._begin_ahead(ahead)
            if held:
                await self.passes.run(layer, x, ids, weights, out, held)
        finally:
            for e in now:
                await self.buffer.release(e)
        await asyncio.gather(*tasks)
        return out

    async def execute_slices(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, part: int,
                             of: int, ahead: Sequence[SliceId] = ()) -> torch.Tensor:
        """Slice `part` of `of` of each expert named in ids, on x (a partial sum: the caller adds
        the other slices' outputs). A whole expert in memory gives its slice as a view; else the
        slice is taken from memory, or from its read begun ahead, or read (only its bytes), each
        run as soon as it is in. Then the reads of `ahead` begin, behind those."""
        out = torch.zeros_like(x)

        async def one(e: int) -> None:
            async with self._slice_weights(SliceId(ExpertId(layer, e), part, of)) as w:
                await self.compute(slots.add_experts, out, x, ids, weights, {e: w})

        named = [e for e in sorted(set(ids.flatten().tolist())) if e >= 0]
        self.slice_runs += len(named)
        self.read_ahead.drop_unasked([SliceId(ExpertId(layer, e), part, of) for e in named])
        runs = [asyncio.ensure_future(one(e)) for e in named]
        if ahead:
            await asyncio.sleep(0)  # each run has queued its read (or found its slice) first
            await self._begin_ahead(ahead)
        await asyncio.gather(*runs)
        return out

    async def _begin_ahead(self, ahead: Sequence[SliceId]) -> None:
        for piece in ahead:
            await self.read_ahead.start(piece)

    @contextlib.asynccontextmanager
    async def _slice_weights(self, piece: SliceId) -> AsyncIterator[ExpertWeights]:
        """A slice's weights while they are used: a view of its whole expert where that is in
        memory, else the slice held (pinned), else read for this run alone where holding it
        would evict a whole expert."""
        try:  # pinned without yielding, so it cannot go between the check and the pin
            whole = self.buffer.acquire_resident(piece.expert)
        except KeyError:
            ahead = self.read_ahead.take(piece)
            if ahead is not None:  # begun on the home's guess, not held
                yield await self.buffer.stream(piece, ahead)
                return
            if not self.buffer.room_for_slice(piece):
                yield await self.buffer.stream(piece)
                return
            async with self.buffer.pinned(piece) as w:
                yield w
            return
        try:
            yield whole.units(*piece.units(self.cfg.expert_size))
        finally:
            await self.buffer.release(piece.expert)
