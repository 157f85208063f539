"""One decode step's spans, checked against the requests' caches on their home.

    spans (DecodeStepRequest) + the home's caches -> DecodeBatch (the rows a step computes)

A span starts where its request's K/V ends and fits its cache; a span with no tokens follows the
token the home sampled in the request's last step and gets that token here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from node_agent.kv_cache import KVCache
from node_agent.state import UnknownRequest
from protos.messages import DecodeSpan


@dataclass(frozen=True)
class DecodeBatch:
    """One step's spans on this home, one per request, their tokens concatenated in span order."""

    spans: tuple[DecodeSpan, ...]
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    caches: tuple[KVCache, ...]  # span i's request's cache
    starts: tuple[int, ...]  # span i's first row
    offset: int = 0  # a part's first row in the step's batch (`part`)

    def part(self, first: int, last: int) -> DecodeBatch:
        """Spans first..last-1 as a batch of their own (their rows are rows[first's start:last's])."""
        begin = self.starts[first]
        end = self.starts[last] if last < len(self.spans) else len(self.token_ids)
        return DecodeBatch(self.spans[first:last], self.token_ids[begin:end], self.positions[begin:end],
                           self.caches[first:last], tuple(s - begin for s in self.starts[first:last]),
                           self.offset + begin)

    @property
    def last_rows(self) -> torch.Tensor:
        """[B] each span's last row: the token whose logits the step returns."""
        return torch.tensor([start + len(s.token_ids) - 1 for start, s in zip(self.starts, self.spans)])


# A step of at least this many rows over two or more requests runs, after the first layer that
# waited on peers, as two halves at once (`halves`, Decoder.step): while one half's tokens are
# on the link or at the holders, the home computes the other's layer. Four 128-token prompts
# prefilled together on the emulated LAN (4 agents, 1 Gbit/s, 1 ms): the home's dense work
# (14 ms a layer), its sends (14 ms through its uplink) and the holders' experts (15-23 ms)
# followed each other in every layer, 60 ms a layer. Each half streams the experts its rows
# need again, so the split waits for a layer that calls peers: on the layers all local to the
# home there is nothing to overlap.
PIPELINE_ROWS = 256


def halves(batch: DecodeBatch) -> tuple[DecodeBatch, DecodeBatch] | None:
    """The batch as its first spans and the rest, the cut nearest half its rows; None where it
    has fewer than PIPELINE_ROWS rows or one span, or no cut leaves each half a quarter of them."""
    total = len(batch.token_ids)
    if total < PIPELINE_ROWS or len(batch.spans) < 2:
        return None
    cut = min(range(1, len(batch.spans)), key=lambda i: abs(2 * batch.starts[i] - total))
    if 4 * min(batch.starts[cut], total - batch.starts[cut]) < total:
        return None
    return batch.part(0, cut), batch.part(cut, len(batch.spans))


def decode_batch(spans: Sequence[DecodeSpan], caches: Mapping[str, KVCache], vocab_size: int, agent: str
                 ) -> DecodeBatch:
    """Check a step's spans against the caches (each request once, its span starting where its
    K/V ends and fitting its cache) and give each span that follows a sampled token that token."""
    if not spans:
        raise ValueError("a decode step needs at least one span")
    seen: set[str] = set()
    picked: list[KVCache] = []
    starts: list[int] = []
    resolved: list[DecodeSpan] = []
    row = 0
    for span in spans:
        rid = span.request_id
        cache = caches.get(rid)
        if cache is None:
            raise UnknownRequest(f"request {rid!r} does not decode on agent {agent!r}")
        if rid in seen:
            raise ValueError(f"request {rid!r} appears twice in one decode step")
        if span.follows:
            if cache.sampled is None:
                raise ValueError(f"the span of {rid!r} follows the token sampled in its last step, but that "
                                 f"step sampled none (it ended inside the prompt, or none ran)")
            span = DecodeSpan(request_id=rid, token_ids=(cache.sampled,), position=span.position)
        bad = [t for t in span.token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} of {rid!r} is outside [0, {vocab_size})")
        if span.position != cache.next:
            raise ValueError(f"the span of {rid!r} starts at position {span.position}; its K/V ends at {cache.next}")
        if span.end > cache.capacity:
            raise ValueError(f"the span of {rid!r} ends at position {span.end}, past its cache ({cache.capacity})")
        seen.add(rid)
        resolved.append(span)
        picked.append(cache)
        starts.append(row)
        row += len(span.token_ids)
    token_ids = torch.tensor([t for s in resolved for t in s.token_ids])
    positions = torch.cat([torch.arange(s.position, s.end) for s in resolved])
    return DecodeBatch(tuple(resolved), token_ids, positions, tuple(picked), tuple(starts))
