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
    # A part cut inside a span (`cut`): its last span goes on in the next part (that row is no
    # span's end: no logits, no token), and the next part's first span attends, in every layer,
    # to the K/V this part writes.
    cut_after: bool = False
    cut_before: bool = False

    def part(self, first: int, last: int) -> DecodeBatch:
        """Spans first..last-1 as a batch of their own (their rows are rows[first's start:last's])."""
        begin = self.starts[first]
        end = self.starts[last] if last < len(self.spans) else len(self.token_ids)
        return DecodeBatch(self.spans[first:last], self.token_ids[begin:end], self.positions[begin:end],
                           self.caches[first:last], tuple(s - begin for s in self.starts[first:last]),
                           self.offset + begin)

    def cut(self, row: int) -> tuple[DecodeBatch, DecodeBatch]:
        """The rows before `row` and from it, as two parts; a span that `row` falls inside is cut
        in two pieces of one request (one cache), the first ending the first part."""
        i = max(j for j, start in enumerate(self.starts) if start <= row)
        if self.starts[i] == row:
            return self.part(0, i), self.part(i, len(self.spans))
        span, k = self.spans[i], row - self.starts[i]
        head = DecodeSpan(request_id=span.request_id, token_ids=span.token_ids[:k], position=span.position)
        tail = DecodeSpan(request_id=span.request_id, token_ids=span.token_ids[k:], position=span.position + k)
        first = DecodeBatch((*self.spans[:i], head), self.token_ids[:row], self.positions[:row], self.caches[:i + 1],
                            self.starts[:i + 1], self.offset, cut_after=True)
        second = DecodeBatch((tail, *self.spans[i + 1:]), self.token_ids[row:], self.positions[row:], self.caches[i:],
                             (0, *(s - row for s in self.starts[i + 1:])), self.offset + row, cut_before=True)
        return first, second

    @property
    def ended(self) -> int:
        """The spans that end in this batch (all but a last one cut off, `cut_after`): those
        whose last row's logits the step returns."""
        return len(self.spans) - self.cut_after

    @property
    def last_rows(self) -> torch.Tensor:
        """[B] the last row of each span that ends here (`ended`): the token whose logits the
        step returns."""
        return torch.tensor([start + len(s.token_ids) - 1 for start, s in zip(self.starts, self.spans)][:self.ended],
                            dtype=torch.long)


# A step of at least this many rows runs, after the first layer that waited on peers, as two
# halves at once (`halves`, Decoder.step): while one half's tokens are on the link or at the
# holders, the home computes the other's layer. Four 128-token prompts prefilled together on the
# emulated LAN (4 agents, 1 Gbit/s, 1 ms): the home's dense work (14 ms a layer), its sends (14
# ms through its uplink) and the holders' experts (15-23 ms) followed each other in every layer,
# 60 ms a layer. Each half streams the experts its rows need again, so the split waits for a
# layer that calls peers: on the layers all local to the home there is nothing to overlap.
PIPELINE_ROWS = 256


def halves(batch: DecodeBatch) -> tuple[DecodeBatch, DecodeBatch] | None:
    """The batch as two parts, None where it has fewer than PIPELINE_ROWS rows. The cut falls
    between spans, nearest half the rows, where that leaves each part a quarter of them; else
    (one long prompt) at half the rows, inside the span there (`DecodeBatch.cut`), and the second
    part's layers then wait for the first's (its rows attend to the first's K/V)."""
    total = len(batch.token_ids)
    if total < PIPELINE_ROWS:
        return None
    if len(batch.spans) > 1:
        cut = min(range(1, len(batch.spans)), key=lambda i: abs(2 * batch.starts[i] - total))
        if 4 * min(batch.starts[cut], total - batch.starts[cut]) >= total:
            return batch.cut(batch.starts[cut])
    return batch.cut(total // 2)


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
