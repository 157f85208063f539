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

    @property
    def last_rows(self) -> torch.Tensor:
        """[B] each span's last row: the token whose logits the step returns."""
        return torch.tensor([start + len(s.token_ids) - 1 for start, s in zip(self.starts, self.spans)])


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
