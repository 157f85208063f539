"""Grouped expert passes: the batches of one layer that reach an agent run expert by expert, one
matmul per expert over every owner's rows, instead of a pass each.

Small matmuls waste the core (a 66-row expert matmul costs about 30% more a row than a 256-row
one on this project's CPU, and each pass streams the expert's weights from memory again), so the
fewer and larger the matmuls, the less an executor computes. A pass starts when the compute
thread is free, with every batch queued by then, and batches that arrive while it runs join it:
before each expert the pass takes them in, so they share the experts it has not reached yet and
only the ones it already ran are run again for them. Each batch is released as soon as its last
expert has run. An owner's early run of its own tokens (before its plan comes) is such a batch,
kept per slot, so the peers' batches that reach it during that run share its remaining experts.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from node_agent.model import moe, slots
from node_agent.throttle import ComputePacer


@dataclass
class _Batch:
    """One owner's tokens for a grouped pass, of which it runs the slots whose expert is in held."""

    x: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    out: torch.Tensor | None  # written on the compute thread only; None: keep outputs per slot
    held: dict[int, moe.ExpertWeights]
    parts: list[slots.SlotOutputs] = field(default_factory=list)  # per expert run, when out is None
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    groups: slots.SlotGroups = field(init=False)  # its slots by expert, set when it joins a pass (compute thread)
    todo: set[int] = field(default_factory=set)  # experts still to run for it (compute thread)


class QueuedJobs:
    """Jobs handed to an agent's compute thread and not yet begun, which a pass gives the thread
    up to between experts. Counted from the event loop and the compute thread, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs = 0

    def add(self, n: int) -> None:
        with self._lock:
            self._jobs += n

    def any(self) -> bool:
        return self._jobs > 0


class GroupedPasses:
    def __init__(self, pacer: ComputePacer, thread: Executor, others_waiting: Callable[[], bool] = lambda: False) -> None:
        self._pacer = pacer  # paces each expert's matmul, as the agent's other compute work
        self._thread = thread  # the agent's one compute thread
        self._others_waiting = others_waiting  # other jobs queued for the thread: a pass yields to them
        self._lock = threading.Lock()  # _pending is filled on the event loop, emptied on the thread
        self._pending: dict[int, list[_Batch]] = {}  # layer -> batches waiting to join a pass
        self._paused: dict[int, list[_Batch]] = {}  # layer -> batches of a pass that yielded (compute thread)
        self._draining: set[int] = set()  # layers with a drain task running (event loop only)
        self.formed = 0  # passes run
        self.resumed = 0  # passes taken up again after yielding the thread
        self.steps = 0  # expert matmuls run (per pass: how well the batches share)

    @property
    def queued(self) -> int:
        """Batches waiting for a pass, all layers."""
        with self._lock:
            return sum(len(v) for v in self._pending.values())

    async def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, out: torch.Tensor,
                  held: dict[int, moe.ExpertWeights]) -> None:
        """out += the held experts of ids on x, in the layer's running pass or its next one."""
        await self._join(layer, _Batch(x, ids, weights, out, held))

    async def slots(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    held: dict[int, moe.ExpertWeights]) -> slots.SlotOutputs:
        """The held experts' outputs per (token, slot), kept apart by expert (an owner's early run,
        which its plan may overrule in part), in a pass as `run`'s batches."""
        batch = _Batch(x, ids, weights, None, held)
        await self._join(layer, batch)
        return slots.SlotOutputs.cat(batch.parts, x)

    async def _join(self, layer: int, batch: _Batch) -> None:
        with self._lock:
            self._pending.setdefault(layer, []).append(batch)
        if layer not in self._draining:
            self._draining.add(layer)
            asyncio.ensure_future(self._drain(layer))
        await batch.done

    async def _drain(self, layer: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                with self._lock:
                    if not self._pending.get(layer) and not self._paused.get(layer):
                        return  # checked on the event loop, the only place batches are added
                # Queued behind the thread's other work: the pass takes every batch that arrived
                # meanwhile, not just the first.
                await loop.run_in_executor(self._thread, self._pass, layer, loop)
        finally:
            self._draining.discard(layer)

    def _take(self, layer: int) -> list[_Batch]:
        with self._lock:
            batches = self._pending.pop(layer, [])
        joining = []
        for b in batches:
            if b.done.cancelled():  # its waiter is gone
                continue
            b.groups = slots.SlotGroups.of(b.ids, b.weights, b.held)
            b.todo = set(b.groups.spans)
            joining.append(b)
        return joining

    def _pass(self, layer: int, loop: asyncio.AbstractEventLoop) -> None:
        """On the compute thread: run the layer's batches expert by expert until none is left,
        taking in the ones that arrive, releasing each as soon as it is complete. Between
        experts it gives the thread up to any other job queued for it (attention, a router, a
        combine: the agent's own chain, which the other agents wait for) and goes on later."""
        with self._lock:
            active = self._paused.pop(layer, [])
        if active:
            self.resumed += 1
        else:
            self.formed += 1
        while True:
            error: BaseException | None = None
            with torch.inference_mode(), self._pacer.pace():
                active = [b for b in active if not b.done.cancelled()] + self._take(layer)  # waiters gone: dropped
                try:
                    self._run_next(active)
                except BaseException as exc:  # every waiter hears of it; none hangs
                    error = exc
            for b in active:
                if error is not None or not b.todo:
                    loop.call_soon_threadsafe(_release, b, error)
            if error is not None and not isinstance(error, Exception):
                raise error
            active = [b for b in active if b.todo] if error is None else []
            if not active:
                return
            if self._others_waiting():  # after at least one expert: every pass makes progress
                with self._lock:
                    self._paused[layer] = active
                return

    def _run_next(self, active: list[_Batch]) -> None:
        """The expert with the most slots waiting, over every batch that needs it: the batches
        that join later still share the experts after it."""
        waiting: dict[int, int] = {}  # expert -> slots waiting for it
        for b in active:
            for e in b.todo:
                waiting[e] = waiting.get(e, 0) + b.groups.spans[e][1]
        if not waiting:
            return
        expert = min(waiting, key=lambda e: (-waiting[e], e))
        group = [b for b in active if expert in b.todo]
        outs = slots.run_expert(group[0].held[expert], [(b.x, b.groups) for b in group], expert)
        self.steps += 1
        for b, slot_outs in zip(group, outs):
            b.todo.discard(expert)
            if b.out is None:
                b.parts.append(slot_outs)
            elif slot_outs.rows.numel():
                b.out.index_add_(0, slot_outs.rows, slot_outs.y)

def _release(batch: _Batch, error: BaseException | None) -> None:
    """On the event loop: wake the batch's waiter (unless it was cancelled meanwhile)."""
    if batch.done.done():
        return
    if error is None:
        batch.done.set_result(None)
    else:
        batch.done.set_exception(error)

