"""Grouped expert passes: the batches of one layer that reach an agent while its compute thread is
busy run as one pass, one matmul per expert over every owner's rows, instead of a pass each.

Small matmuls waste the core (a 66-row expert matmul costs about 30% more a row than a 256-row
one on this project's CPU), so the fewer and larger the passes, the less an executor computes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from node_agent.model import moe


@dataclass
class _Batch:
    """One owner's tokens for a grouped pass, of which it runs the slots whose expert is in held."""

    x: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    out: torch.Tensor  # written on the compute thread only
    held: dict[int, moe.ExpertWeights]
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupedPasses:
    def __init__(self, compute: Callable[..., Awaitable[Any]], thread: Executor) -> None:
        self._compute = compute  # runs work on the compute thread, paced
        self._thread = thread  # that thread's executor, to learn when it is free
        self._pending: dict[int, list[_Batch]] = {}  # layer -> batches waiting for a pass
        self._draining: set[int] = set()  # layers with a drain task running
        self.formed = 0  # passes run (batches per pass = how well they share)

    @property
    def queued(self) -> int:
        """Batches waiting for a pass, all layers."""
        return sum(len(v) for v in self._pending.values())

    async def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, out: torch.Tensor,
                  held: dict[int, moe.ExpertWeights]) -> None:
        """out += the held experts of ids on x, in the layer's next pass; one drain per layer
        runs what has gathered whenever the previous pass is done."""
        batch = _Batch(x, ids, weights, out, held)
        self._pending.setdefault(layer, []).append(batch)
        if layer not in self._draining:
            self._draining.add(layer)
            asyncio.ensure_future(self._drain(layer))
        await batch.done

    async def _drain(self, layer: int) -> None:
        try:
            while self._pending.get(layer):
                # Form the pass when the compute thread is free, not when the first batch came:
                # the batches that arrive while it finishes other work (an early run, a previous
                # pass) then share one matmul per expert instead of taking a pass each.
                await asyncio.get_running_loop().run_in_executor(self._thread, _nothing)
                group = [b for b in self._pending.pop(layer) if not b.done.cancelled()]  # waiters gone
                if not group:
                    continue
                self.formed += 1
                error: BaseException | None = None
                try:
                    await self._compute(_run_group, group)
                except BaseException as exc:  # every waiter hears of it; none hangs
                    error = exc
                for b in (b for b in group if not b.done.done()):  # a waiter may have been cancelled
                    if error is None:
                        b.done.set_result(None)
                    else:
                        b.done.set_exception(error)
                if error is not None and not isinstance(error, Exception):
                    raise error
        finally:
            self._draining.discard(layer)


def _nothing() -> None:
    pass


def _run_group(group: Sequence[_Batch]) -> None:
    """out += experts(x) for every batch of the group, one matmul per expert over all its rows."""
    experts = {i: w for b in group for i, w in b.held.items()}

    def own_slots(b: _Batch) -> torch.Tensor:
        # A batch's other slots may name an expert another batch holds: mask them to -1 (skipped).
        if b.held.keys() == experts.keys():
            return b.ids
        return torch.where(torch.isin(b.ids, torch.tensor(list(b.held))), b.ids, -1)

    moe.add_experts_batches([(b.out, b.x, own_slots(b), b.weights) for b in group], experts)
