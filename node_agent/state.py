"""What an agent keeps for one request: its KV shard, the current step's tokens, the K/V inbox."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from node_agent.model.slots import SlotOutputs
from protos.messages import Peer as Peer  # another agent as one step sees it (StepPeer)


class RequestReleased(Exception):
    """The request was released (finished or cancelled) while work for it was waiting."""


class UnknownRequest(KeyError):
    """A message names a request this agent has no state for."""


@dataclass
class KVShard:
    """K/V of this agent's own tokens for one layer, RoPE applied."""

    k: torch.Tensor  # [S, KVH, hd]
    v: torch.Tensor  # [S, KVH, hd]
    pos: torch.Tensor  # [S] absolute positions

    def append(self, other: KVShard) -> KVShard:
        return KVShard.cat([self, other])

    def visible_to(self, last_query: int) -> KVShard:
        """The rows that queries at positions up to last_query can see: keys not after it (causal).
        A peer whose tokens all come before some of mine needs only the rest: with a zigzag
        split, half the agents' K/V blocks to their peers are half as large."""
        keep = self.pos <= last_query
        if bool(keep.all()):
            return self
        return KVShard(self.k[keep], self.v[keep], self.pos[keep])

    @staticmethod
    def cat(shards: Sequence[KVShard]) -> KVShard:
        return KVShard(torch.cat([s.k for s in shards]), torch.cat([s.v for s in shards]), torch.cat([s.pos for s in shards]))

    @staticmethod
    def union(shards: Sequence[KVShard]) -> KVShard:
        """Several shards as one, in position order: the zigzag blocks of the other agents then
        form long runs of consecutive positions, which attention takes in few fused calls."""
        if len(shards) == 1:
            return shards[0]
        kv = KVShard.cat(shards)
        order = torch.argsort(kv.pos)
        return KVShard(kv.k[order], kv.v[order], kv.pos[order])


@dataclass
class EarlyExperts:
    """This agent's own tokens through the experts of `layer` it holds, started as soon as its
    router has run, while the scheduler still waits for the other agents' reports: the plan
    usually sends an owner's tokens to the one agent holding each expert, so the work is done
    when the plan arrives. An expert's share is used only if the plan gives this agent all of
    its own slots of that expert; the rest is dropped (the plan decides, the guess saves time)."""

    layer: int
    experts: frozenset[int]
    out: asyncio.Future[SlotOutputs]


@dataclass(frozen=True)
class DirectSends:
    """This agent's tokens of `layer` sent, as soon as its router had run, to the executors that
    the scheduler's direct routes named; the layer's plan keeps those experts there, so they are
    not sent again when it comes."""

    layer: int
    experts: frozenset[int]
    results: tuple[asyncio.Future[tuple[torch.Tensor, torch.Tensor]], ...]  # (rows, outputs) per executor


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
    early: EarlyExperts | None = None  # own tokens through held experts, begun before the plan
    direct: DirectSends | None = None  # own tokens sent to other executors by direct routes

    def drop_early(self) -> None:
        """Cancel the work begun before the plan (the step or request ends without it)."""
        if self.early is not None:
            self.early.out.cancel()
            self.early = None
        if self.direct is not None:
            for result in self.direct.results:
                result.cancel()
            self.direct = None

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
    touched: float = field(default_factory=time.monotonic)  # when a message last named it (its time to live)

    def inbox_bytes(self) -> int:
        return sum(2 * shard.k.nbytes + shard.pos.nbytes for senders in self.inbox.values()
                   for chunks in senders.values() for _, shard in chunks.values())

    def commit_step(self) -> None:
        """Fold the finished step's own K/V into the shard (called when the next step begins)."""
        if self.step is None:
            return
        self.step.drop_early()
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

    async def next_blocks(self, step: int, layer: int, pending: set[str], timeout_s: float) -> dict[str, KVShard]:
        """The K/V of every pending sender whose block is complete (reassembled from its chunks),
        once there is at least one: attention takes what has arrived while the rest is in transit."""
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
            senders = [s for s in sorted(pending) if self._complete(step, layer, s)]
            got = {s: self.inbox[(step, layer)].pop(s) for s in senders}
        return {sender: KVShard.cat([chunks[i][1] for i in sorted(chunks)]) for sender, chunks in got.items()}

    async def release(self) -> None:
        if self.step is not None:
            self.step.drop_early()
        async with self.arrived:
            self.released = True
            self.inbox.clear()
            self.arrived.notify_all()
