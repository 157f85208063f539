"""What an agent keeps for one request: its KV shard, the current step's tokens, the K/V inbox."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch


class RequestReleased(Exception):
    """The request was released (finished or cancelled) while work for it was waiting."""


class UnknownRequest(KeyError):
    """A message names a request this agent has no state for."""


@dataclass(frozen=True)
class Peer:
    """Another agent as one step sees it (from the scheduler's StepPeer)."""

    name: str
    address: str
    new_min: int  # smallest new position this step, -1 if it has no new tokens
    new_max: int  # largest new position this step, -1 if none
    cached: int  # KV entries it holds from earlier steps

    @property
    def has_new(self) -> bool:
        return self.new_max >= 0


@dataclass
class KVShard:
    """K/V of this agent's own tokens for one layer, RoPE applied."""

    k: torch.Tensor  # [S, KVH, hd]
    v: torch.Tensor  # [S, KVH, hd]
    pos: torch.Tensor  # [S] absolute positions

    def append(self, other: KVShard) -> KVShard:
        return KVShard(torch.cat([self.k, other.k]), torch.cat([self.v, other.v]), torch.cat([self.pos, other.pos]))


@dataclass
class StepState:
    step: int
    positions: torch.Tensor  # [T] of this agent's new tokens
    hidden: torch.Tensor  # [T, D] residual stream
    peers: tuple[Peer, ...]  # every agent in the step, this one included
    all_logits: bool
    moe_in: torch.Tensor | None = None  # [T, D] post-attention-norm input of the pending MoE
    route: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids [T,k], weights [T,k]) pending
    new_kv: dict[int, KVShard] = field(default_factory=dict)  # layer -> this step's own K/V
    predicted: tuple[int, frozenset[int]] | None = None  # (layer, experts its router should pick)

    @property
    def last_position(self) -> int:
        """The step's last position over all agents: the one whose logits sample the next token."""
        return max(p.new_max for p in self.peers)

    def final_only(self, layer: int, num_layers: int) -> torch.Tensor | None:
        """Rows whose MoE the last layer still needs, or None for all: the next token depends on
        the last layer only through the final position (the other tokens' K/V are complete)."""
        if layer != num_layers - 1 or self.all_logits:
            return None
        return self.positions == self.last_position


@dataclass
class RequestState:
    request_id: str
    kv: dict[int, KVShard] = field(default_factory=dict)  # layer -> K/V of earlier steps
    step: StepState | None = None
    # (step, layer) -> sender -> {chunk index: shard}: K/V pushed by peers for this step.
    inbox: dict[tuple[int, int], dict[str, dict[int, tuple[int, KVShard]]]] = field(default_factory=dict)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    released: bool = False

    def commit_step(self) -> None:
        """Fold the finished step's own K/V into the shard (called when the next step begins)."""
        if self.step is None:
            return
        for layer, new in self.step.new_kv.items():
            self.kv[layer] = self.kv[layer].append(new) if layer in self.kv else new
        self.inbox = {key: v for key, v in self.inbox.items() if key[0] > self.step.step}
        self.step = None

    def cached_tokens(self) -> int:
        return int(self.kv[0].pos.numel()) if 0 in self.kv else 0

    async def deliver(self, step: int, layer: int, sender: str, chunk: int, num_chunks: int, shard: KVShard) -> None:
        async with self.arrived:
            self.inbox.setdefault((step, layer), {}).setdefault(sender, {})[chunk] = (num_chunks, shard)
            self.arrived.notify_all()

    def _complete(self, step: int, layer: int, sender: str) -> bool:
        chunks = self.inbox.get((step, layer), {}).get(sender)
        return chunks is not None and len(chunks) == next(iter(chunks.values()))[0]

    async def next_block(self, step: int, layer: int, pending: set[str], timeout_s: float) -> tuple[str, KVShard]:
        """The K/V of whichever pending sender's block is complete first (reassembled from its
        chunks), so attention on it can start while the others are still in transit."""
        async with self.arrived:
            try:
                await asyncio.wait_for(
                    self.arrived.wait_for(lambda: self.released or any(self._complete(step, layer, s) for s in pending)),
                    timeout_s,
                )
            except TimeoutError:
                raise TimeoutError(f"K/V of layer {layer} from {sorted(pending)} did not arrive within {timeout_s}s") from None
            if self.released:
                raise RequestReleased(self.request_id)
            sender = next(s for s in sorted(pending) if self._complete(step, layer, s))
            got = self.inbox[(step, layer)].pop(sender)
        chunks = [got[i][1] for i in sorted(got)]
        return sender, KVShard(
            torch.cat([c.k for c in chunks]), torch.cat([c.v for c in chunks]), torch.cat([c.pos for c in chunks])
        )

    async def release(self) -> None:
        async with self.arrived:
            self.released = True
            self.inbox.clear()
            self.arrived.notify_all()
