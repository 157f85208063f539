"""A decode request's K/V on its home agent: preallocated for every position the request can
reach, filled with the prompt's rows as they arrive (the home's own prefill shard at once, the
other agents' layer by layer), each layer's readiness an event a decode step waits on; or, when
the home prefills the prompt itself, written by its decode steps from position 0."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from node_agent.model.config import MoeConfig
from node_agent.state import KVShard


class KVNotReady(RuntimeError):
    """The prompt's K/V could not be gathered on the home (a source failed or rows are missing)."""


@dataclass
class KVCache:
    """One request's K/V on its home agent, preallocated for every position it can reach."""

    k: torch.Tensor  # [L, KVH, capacity, hd], RoPE applied
    v: torch.Tensor  # [L, KVH, capacity, hd]
    prompt: int  # positions 0..prompt-1 come from the prefill
    ready: list[asyncio.Event]  # per layer: every prompt row is in
    filled: list[int]  # per layer: prompt rows in so far
    next: int  # the position the next step's span must start at (every row before it is in)
    error: BaseException | None = None  # why the prompt's K/V could not be gathered
    fetch: asyncio.Task[None] | None = None  # the background pull from the other agents

    @classmethod
    def allocate(cls, cfg: MoeConfig, capacity: int, prompt: int, dtype: torch.dtype, here: bool = False) -> KVCache:
        """With `here`, no prefill ran elsewhere: nothing is gathered (every layer is ready) and
        the home's steps write the prompt's rows from position 0."""
        shape = (cfg.num_layers, cfg.num_kv_heads, capacity, cfg.head_dim)
        ready = [asyncio.Event() for _ in range(cfg.num_layers)]
        if here:
            for event in ready:
                event.set()
        return cls(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), prompt, ready,
                   [prompt if here else 0] * cfg.num_layers, 0 if here else prompt)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def put(self, layer: int, shard: KVShard) -> None:
        """Rows of the prompt from one shard (any positions, each once)."""
        pos = shard.pos
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= self.prompt):
            raise KVNotReady(f"K/V rows at positions outside the prompt (0..{self.prompt - 1})")
        self.k[layer, :, pos] = shard.k.transpose(0, 1).to(self.k.dtype)
        self.v[layer, :, pos] = shard.v.transpose(0, 1).to(self.v.dtype)
        self.filled[layer] += int(pos.numel())
        if self.filled[layer] >= self.prompt:
            self.ready[layer].set()

    def ready_at(self, layer: int) -> bool:
        """Whether the layer's prompt K/V is all in (safe to read from the compute thread)."""
        return self.ready[layer].is_set() and self.error is None and self.filled[layer] == self.prompt

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        for event in self.ready:
            event.set()  # waiters wake and find the error

    async def wait(self, layer: int, timeout_s: float) -> bool:
        """Wait until the layer's prompt K/V is in; returns whether it had to wait."""
        waited = not self.ready[layer].is_set()
        if waited:
            try:
                await asyncio.wait_for(self.ready[layer].wait(), timeout_s)
            except TimeoutError:
                raise TimeoutError(f"prompt K/V of layer {layer} did not arrive within {timeout_s}s") from None
        if self.error is not None:
            raise KVNotReady(f"the prompt's K/V could not be gathered: {self.error}") from self.error
        if self.filled[layer] != self.prompt:
            raise KVNotReady(f"layer {layer} got {self.filled[layer]} prompt K/V rows, expected {self.prompt}")
        return waited
