"""A decode request's K/V on its home agent: preallocated for every position the request can
reach, filled with the prompt's rows as they arrive (the home's own prefill shard at once, the
other agents' layer by layer), each layer's readiness an event a decode step waits on; or, when
the home prefills the prompt itself, written by its decode steps from position 0.

While a layer's rows are still on their way, a decode step either waits for them or attends
over them where they are (split-KV: the sources return partial attention, one more round trip
in that layer); `attend_where_it_is` chooses by when the layer should arrive, from the pull's
measured pace, against a round trip."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from node_agent.model.config import MoeConfig
from node_agent.peers import PeerFailed
from node_agent.state import KVShard
from protos.messages import SamplingParams


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
    own: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # prompt positions held from the start
    sources: tuple[tuple[str, str], ...] = ()  # (name, address) of the agents holding the rest of the prompt's rows
    pulled: int = 0  # layers whose rows from every source are in (they arrive in layer order)
    layer_s: float | None = None  # seconds one layer's pull took, the last one measured
    pulled_at: float = 0.0  # monotonic time the last layer came in (or the pull began)
    reported: bool = False  # the scheduler has heard that every row is in
    sampling: SamplingParams = SamplingParams(max_tokens=1)  # how the home samples the request's tokens
    drawn: int = 0  # the index of the request's next token to sample (token_generator(seed, drawn))
    sampled: int | None = None  # the token sampled after its last step (a span that follows feeds it)
    touched: float = field(default_factory=time.monotonic)  # when a step last used it (its time to live)

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

    def pulled_layer(self, layer: int) -> None:
        """Every source's rows of `layer` are in (called in layer order)."""
        now = time.monotonic()
        self.layer_s, self.pulled_at, self.pulled = now - self.pulled_at, now, layer + 1
        self.ready[layer].set()

    @property
    def gathered(self) -> bool:
        """Every prompt row of every layer is here."""
        return self.error is None and all(self.ready_at(layer) for layer in range(len(self.ready)))

    def arrival_s(self, layer: int) -> float | None:
        """Seconds until `layer`'s rows should be in, at the pace the pull has kept; None before
        its first layer is in (no pace yet)."""
        if self.layer_s is None:
            return None
        return max(0.0, (layer - self.pulled + 1) * self.layer_s - (time.monotonic() - self.pulled_at))

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


class KVPeers(Protocol):
    async def fetch_kv(self, name: str, address: str, request_id: str, layer: int) -> KVShard: ...


class HomeCaches:
    """The caches of the requests homed on an agent: opened empty for a prompt prefilled here, or
    adopted after a sequence-parallel prefill with the other agents' rows pulled in the background."""

    def __init__(self, name: str, cfg: MoeConfig, dtype: torch.dtype, peers: KVPeers) -> None:
        self.name, self.cfg, self.dtype, self.peers = name, cfg, dtype, peers
        self.caches: dict[str, KVCache] = {}

    def adopt(self, request_id: str, capacity: int, prompt: int, own: dict[int, KVShard],
              sources: Sequence[tuple[str, str]], here: bool = False,
              sampling: tuple[SamplingParams, int] | None = None) -> int:
        """Become the request's home: a cache for `capacity` positions holding my own prefill
        shard now and the sources' (name, address) shards as they arrive; returns my rows. With
        `here`, no prefill ran: the steps' spans bring the prompt from position 0. Its tokens are
        sampled with `sampling`'s parameters, the first as token number `sampling[1]` of the
        request (default: temperature 1, seed 0, from its first token)."""
        if not 0 < prompt <= capacity <= self.cfg.max_positions:
            raise ValueError(f"K/V capacity {capacity} must hold the prompt ({prompt} tokens) and fit the "
                             f"model's context ({self.cfg.max_positions})")
        if request_id in self.caches:
            raise ValueError(f"request {request_id!r} already decodes on agent {self.name!r}")
        if here and (own or sources):
            raise ValueError(f"request {request_id!r} has prefill K/V: its prompt cannot be prefilled on its home")
        cache = KVCache.allocate(self.cfg, capacity, prompt, self.dtype, here)
        if sampling is not None:
            cache.sampling, cache.drawn = sampling
        for layer, shard in own.items():
            cache.put(layer, shard)
        self.caches[request_id] = cache
        if 0 in own:
            cache.own = own[0].pos.sort().values
        if sources:
            cache.sources, cache.pulled_at = tuple(sources), time.monotonic()
            cache.fetch = asyncio.ensure_future(self._pull(request_id, cache, sources))
        else:
            for layer in range(self.cfg.num_layers):
                cache.ready[layer].set()  # checked against `filled` when a step waits on it
        return int(own[0].pos.numel()) if 0 in own else 0

    async def _pull(self, request_id: str, cache: KVCache, sources: Sequence[tuple[str, str]]) -> None:
        """Every source's K/V, layer by layer (the first decode step's layer 0 needs layer 0 first)."""
        try:
            for layer in range(self.cfg.num_layers):
                shards = await asyncio.gather(*(self.peers.fetch_kv(n, a, request_id, layer) for n, a in sources))
                for shard in shards:
                    cache.put(layer, shard)
                cache.pulled_layer(layer)
        except asyncio.CancelledError:
            raise
        except PeerFailed as exc:  # the step that waits on this layer reports it, naming the source
            cache.fail(exc)
        except Exception as exc:
            names = ", ".join(n for n, _ in sources)
            cache.fail(RuntimeError(f"pulling K/V from {names}: {exc}"))

    def release(self, request_id: str) -> None:
        cache = self.caches.pop(request_id, None)
        if cache is not None and cache.fetch is not None:
            cache.fetch.cancel()

    def newly_gathered(self, request_ids: Sequence[str]) -> list[str]:
        """Those of the requests whose prompt K/V has all arrived since the last report (each
        reported once: the scheduler then releases it on the agents it came from)."""
        done = [r for r in request_ids if (c := self.caches.get(r)) is not None and not c.reported and c.gathered]
        for rid in done:
            self.caches[rid].reported = True
        return done


def attend_where_it_is(arrival_s: float | None, round_trip_s: float | None) -> bool:
    """Whether a decode step attends over a layer's prompt K/V on the agents that hold it
    (split-KV) instead of waiting for it to arrive: when it is further off than the round trip
    that costs. Unknown arrival (the pull has no pace yet) or round trip: wait, as the move's
    first layer gives the pace, and every source has then finished its prefill step."""
    if arrival_s is None or round_trip_s is None:
        return False
    return arrival_s > round_trip_s
