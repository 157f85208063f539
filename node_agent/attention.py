"""One agent's share of sequence-parallel attention: its queries over its own K/V, over the K/V
blocks its peers push for this step, and (decode) split-KV over the peers' K/V of earlier steps.

Peers are reached through an injected `KVPeers`, and torch work goes through the agent's paced
compute thread (`Compute`), so this module holds no gRPC and no thread of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import torch

from node_agent.model import moe
from node_agent.model.config import MoeConfig
from node_agent.state import KVShard, RequestState, StepState, UnknownRequest

R = TypeVar("R")


class KVPeers(Protocol):
    """K/V calls to the peer `name` at `address` (its name goes into any error)."""

    async def push_kv(self, name: str, address: str, request_id: str, step: int, layer: int, shard: KVShard
                      ) -> None: ...
    async def attend(self, name: str, address: str, request_id: str, layer: int, q: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]: ...


class Compute(Protocol):
    def __call__(self, fn: Callable[..., R], *args: object) -> Awaitable[R]: ...


class PeerAttention:
    def __init__(self, name: str, cfg: MoeConfig, dense: moe.DenseWeights, peers: KVPeers, compute: Compute,
                 peer_timeout_s: float) -> None:
        self.name, self.cfg, self.dense, self.peers, self.compute = name, cfg, dense, peers, compute
        self.peer_timeout_s = peer_timeout_s  # how long to wait for a peer's K/V block

    async def layer(self, request_id: str, state: RequestState, st: StepState, layer: int) -> None:
        """st.hidden += attention of `layer` for this agent's new tokens (their K/V kept in st)."""
        w = self.dense.layers[layer]
        q, k, v = await self.compute(moe.qkv, w, self.cfg, st.hidden, st.positions)
        own_new = KVShard(k, v, st.positions)
        st.new_kv[layer] = own_new
        lo, hi = int(st.positions.min()), int(st.positions.max())
        others = [p for p in st.peers if p.name != self.name]
        # Push my new K/V to every peer with a query that can see one of my keys: the keys it can see.
        pushes = [
            asyncio.ensure_future(self.peers.push_kv(p.name, p.address, request_id, st.step, layer,
                                                     own_new.visible_to(p.new_max)))
            for p in others if p.has_new and p.new_max > lo
        ]
        # Split-KV over peers' K/V from earlier steps (decode): they return partial out + lse.
        pulls = [asyncio.ensure_future(self.peers.attend(p.name, p.address, request_id, layer, q))
                 for p in others if p.cached > 0]
        try:
            mine = state.kv[layer].append(own_new) if layer in state.kv else own_new
            parts = [await self.compute(moe.attend, q, mine.k, mine.v, st.positions, mine.pos)]
            pending = {p.name for p in others if p.has_new and p.new_min < hi}
            while pending:  # attend to the peers' blocks as soon as they are in, all that are in at once
                blocks = await state.next_blocks(st.step, layer, pending, self.peer_timeout_s)
                pending.difference_update(blocks)

                def attend_blocks(shards: list[KVShard] = list(blocks.values())) -> tuple[torch.Tensor, torch.Tensor]:
                    kv = KVShard.union(shards)
                    return moe.attend(q, kv.k, kv.v, st.positions, kv.pos)

                parts.append(await self.compute(attend_blocks))
            parts.extend(await asyncio.gather(*pulls))
            await asyncio.gather(*pushes)
        except BaseException:
            for task in pushes + pulls:
                task.cancel()
            raise
        st.hidden = await self.compute(lambda: moe.attention_output(w, st.hidden, moe.merge(parts)))

    async def over_cache(self, request_id: str, state: RequestState, layer: int, q: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """A peer's queries over my K/V from earlier steps (all of it precedes them): out, lse."""
        shard = state.kv.get(layer)
        if shard is None:
            raise UnknownRequest(f"request {request_id!r} has no K/V for layer {layer} on agent {self.name!r}")
        return await self.compute(moe.attend, q, shard.k, shard.v)
