"""Where one decode step has got to (`Run`), and a big step's two halves (`parts_of`, `join`).

    Run (one step's rows: the layer it is at, the residual stream, remote outputs still to add)
    -> with `decode_batch.halves`, after the first layer that called peers: parts_of -> a Run
    per half, each going on through the layers at once -> join -> the step's logits, tokens and
    selections in span order
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from node_agent.decode_attention import Partial
from node_agent.decode_batch import DecodeBatch
from node_agent.decode_sends import Rows
from node_agent.expert_buffer import LayerPins
from node_agent.model import moe, slots
from protos.messages import TokenEvent


@dataclass
class Waits:
    """Seconds of decode steps spent waiting rather than computing (metrics; see CacheCounters)."""

    peers_s: float = 0.0  # on peers only: remote experts, split attention, K/V still arriving
    reads_s: float = 0.0  # on experts read here on demand (no agent held them), peers' runs beside


@dataclass
class Run:
    """Where one decode step has got to, handed between the event loop and the compute thread
    (only one of them touches it at a time)."""

    batch: DecodeBatch
    cos: torch.Tensor  # [T, 1, hd] rotary rows at the batch's positions
    sin: torch.Tensor
    pins: dict[int, LayerPins] = field(default_factory=dict)  # layer -> its resident experts, pinned for a job
    used: dict[int, list[int]] = field(default_factory=dict)  # layer -> experts a job ran here (cache hits)
    layer: int = 0  # the next layer to run
    h: torch.Tensor | None = None  # [T, D] residual stream after the layers run so far
    done: list[Rows] = field(default_factory=list)  # remote outputs still to add to h
    logits: torch.Tensor | None = None  # [B, V] once the step is through
    tokens: tuple[TokenEvent | None, ...] = ()  # sampled after each span (None inside a prompt), with the logits
    split: frozenset[int] = frozenset()  # spans attending at `layer` over prompt K/V still at its sources
    paused: tuple[torch.Tensor, torch.Tensor] | None = None  # (h, attn) of `layer`, waiting on split partials
    partials: dict[int, list[Partial]] = field(default_factory=dict)  # span -> its partials at `layer`
    chosen: list[torch.Tensor] = field(default_factory=list)  # [T, k] experts each token chose, per MoE layer run
    # The last layer's experts ran for each span's last row only, and `h` holds those rows alone
    # ([B, D], span order): no other row's output is read after the last layer (a prompt's
    # other rows leave their K/V, written before), so their expert work, sends and reads are skipped.
    narrowed: bool = False
    # The part before this one where the step was cut inside a span (`DecodeBatch.cut`): this
    # part's rows attend to its K/V, so each of this part's layers waits until it is written.
    after: Run | None = None
    _waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)  # (layer, woken past it)
    # An inline layer's local experts left to the compute thread (x, ids, weights, experts): see
    # INLINE_LOCAL_EXPERTS; their output still to add to h, the layer's remote outputs beside it.
    local: tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[int, moe.ExpertWeights]] | None = None

    def moved(self) -> None:
        """On the event loop, after a job: wake the parts waiting for a layer this one is past."""
        done = self.logits is not None
        for layer, waiter in self._waiters:
            if (done or self.layer > layer) and not waiter.done():
                waiter.set_result(None)
        self._waiters = [(layer, w) for layer, w in self._waiters if not w.done()]

    async def past(self, layer: int) -> None:
        """Until this part's jobs have run `layer` (its K/V of that layer is written)."""
        if self.logits is not None or self.layer > layer:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((layer, waiter))
        await waiter


def parts_of(run: Run, parts: Sequence[DecodeBatch]) -> list[Run]:
    """Where `run` has got to, for each of `parts` (`halves`: runs of its rows)."""
    assert run.h is not None and run.paused is None and not run.narrowed
    h, run.done = slots.with_rows(run.h, run.done), []
    out: list[Run] = []
    for part in parts:
        rows = slice(part.offset - run.batch.offset, part.offset - run.batch.offset + len(part.token_ids))
        out.append(Run(part, run.cos[rows], run.sin[rows], layer=run.layer, h=h[rows],
                       after=out[-1] if part.cut_before and out else None))
    return out


def join(run: Run, parts: Sequence[Run]) -> None:
    """The logits, tokens and selections of halves that went on from `run`, in `run`'s order."""
    logits = [p.logits for p in parts if p.logits is not None]
    assert len(logits) == len(parts), "a half ended before its logits"
    run.logits = torch.cat(logits)
    run.tokens = tuple(t for p in parts for t in p.tokens)
    run.chosen += [torch.cat(layer) for layer in zip(*(p.chosen for p in parts))]
