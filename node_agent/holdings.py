"""What an agent keeps in its expert memory at the scheduler's word: fills (experts no agent
holds, read into free memory), the placement (pinned experts, some fetched from peers), and the
chunks of its resident experts that peers fetch for theirs. The buffer stores; this checks the
requests and wires the peers in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from node_agent.expert_buffer import ExpertBuffer, FetchFn, NotResident
from node_agent.model import moe
from node_agent.model.config import MoeConfig
from node_agent.peers import row_chunks
from protos.ids import ExpertId


class ExpertPeers(Protocol):
    async def fetch_expert(self, name: str, address: str, eid: ExpertId
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Peer `name`'s resident expert eid: (gate [I, D], up [I, D], down [D, I])."""
        ...


class Holdings:
    def __init__(self, name: str, cfg: MoeConfig, dtype: torch.dtype, buffer: ExpertBuffer, peers: ExpertPeers) -> None:
        self.name, self.cfg, self.dtype, self.buffer, self.peers = name, cfg, dtype, buffer, peers

    async def fill(self, experts: Sequence[ExpertId], evict: Sequence[ExpertId] = (), prefetch: bool = False
                   ) -> tuple[list[ExpertId], list[ExpertId]]:
        """Give up the cache entries in `evict` (`ExpertBuffer.give_up`), then queue reads of
        `experts` into free expert memory, never evicting: at the lowest disk priority, or with
        `prefetch` (the decode prefetch) at a prefetch's, their room kept from other loads.
        Returns (those now resident or on their way, those given up)."""
        self._check_routed([*experts, *evict])
        evicted = [eid for eid in evict if await self.buffer.give_up(eid)]
        return [eid for eid in experts if self.buffer.fill(eid, prefetch)], evicted

    def place(self, experts: Sequence[ExpertId], sources: Sequence[tuple[ExpertId, str, str]] = ()
              ) -> tuple[int, int]:
        """Keep these experts resident (the scheduler's placement; see ExpertBuffer.place), those
        in `sources` (expert, holder, address) fetched from that peer's memory rather than read;
        returns (experts placed, of them resident now)."""
        self._check_routed([*experts, *(e for e, _, _ in sources)])

        def from_peer(holder: str, address: str) -> FetchFn:
            return lambda eid: self._fetch_expert(holder, address, eid)

        self.buffer.place(experts, {eid: from_peer(h, a) for eid, h, a in sources if h != self.name})
        return len(self.buffer.placed), len(self.buffer.placed & set(self.buffer.all_resident()))

    async def _fetch_expert(self, holder: str, address: str, eid: ExpertId) -> moe.ExpertWeights:
        gate, up, down = await self.peers.fetch_expert(holder, address, eid)
        D, I = self.cfg.hidden_size, self.cfg.expert_size
        if gate.shape != (I, D) or up.shape != (I, D) or down.shape != (D, I):
            raise ValueError(f"agent {holder} sent expert {eid.layer}/{eid.index} of shapes {list(gate.shape)}, "
                             f"{list(up.shape)}, {list(down.shape)}; this model's are [{I}, {D}] and [{D}, {I}]")
        dtype = self.dtype
        return moe.ExpertWeights(gate.to(dtype), up.to(dtype), down.to(dtype))

    async def expert_part(self, eid: ExpertId, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Chunk `chunk` of a resident expert for a peer that places it: (gate rows, up rows, down
        columns, number of chunks), cut along the hidden units. NotResident if it is not in memory."""
        self._check_routed([eid])
        try:
            w = self.buffer.acquire_resident(eid)
        except KeyError:
            raise NotResident(f"expert {eid.layer}/{eid.index} is not in agent {self.name}'s memory") from None
        try:
            row_bytes = 3 * w.gate.shape[1] * w.gate.element_size()  # a hidden unit: a gate, up and down row
            chunks = row_chunks(w.gate.shape[0], row_bytes)
            if not 0 <= chunk < len(chunks):
                raise ValueError(f"chunk {chunk} of {len(chunks)}")
            rows = chunks[chunk]
            return w.gate[rows].clone(), w.up[rows].clone(), w.down[:, rows].contiguous(), len(chunks)
        finally:
            await self.buffer.release(eid)

    def _check_routed(self, experts: Sequence[ExpertId]) -> None:
        for eid in experts:
            if not (self.cfg.has_experts(eid.layer) and 0 <= eid.index < self.cfg.num_experts):
                raise ValueError(f"expert {eid.layer}/{eid.index} is not a routed expert of this model")
