"""A decode step's attention on the home: each span over its request's cache, causal within a
prompt chunk; and, for a request whose prompt K/V of the layer is still on its way (split-KV,
chosen by `kv_cache.attend_where_it_is`), the partial attention over the rows the home holds,
to be merged with the partials the sources return for theirs.

Pure torch on the compute thread; the decoder sends the sources their queries.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from node_agent.kv_cache import KVCache
from node_agent.model import moe
from protos.messages import DecodeSpan

Partial = tuple[torch.Tensor, torch.Tensor]  # (out [1, H, hd], lse [1, H]) over a subset of the keys


def attend_spans(layer: int, spans: Sequence[DecodeSpan], caches: Sequence[KVCache], starts: Sequence[int],
                 q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, split: Collection[int]
                 ) -> tuple[torch.Tensor, dict[int, Partial]]:
    """Write the spans' K/V [T, KVH, hd] into their caches and attend: (attn [T, H, hd], with the
    rows of the spans in `split` left to fill; and their partials over the rows held here)."""
    attn = torch.empty_like(q)
    partials: dict[int, Partial] = {}
    for i, (span, cache, start) in enumerate(zip(spans, caches, starts)):
        p, end, rows = span.position, span.end, slice(start, start + len(span.token_ids))
        cache.k[layer, :, p:end] = k[rows].transpose(0, 1)
        cache.v[layer, :, p:end] = v[rows].transpose(0, 1)
        if i in split:  # a decode token (one row): its prompt's other rows are elsewhere
            held = torch.cat([cache.own, torch.arange(cache.prompt, end)])
            partials[i] = moe.attend(q[rows], cache.k[layer, :, held].transpose(0, 1),
                                     cache.v[layer, :, held].transpose(0, 1))
            continue
        keys, values = cache.k[layer, :, :end], cache.v[layer, :, :end]  # [KVH, end, hd]
        if end - p == 1:
            attn[start] = moe.attend_cached(q[start], keys, values)
        else:  # a prompt chunk: causal within it, after every earlier position
            attn[rows] = moe.attend(q[rows], keys.transpose(0, 1), values.transpose(0, 1),
                                    torch.arange(p, end), torch.arange(end))[0]
    return attn, partials


def merge_split(attn: torch.Tensor, starts: Sequence[int], partials: dict[int, list[Partial]]) -> torch.Tensor:
    """attn with each split span's row set from its partials (the home's and the sources')."""
    for i, parts in partials.items():
        attn[starts[i]] = moe.merge(parts)[0]
    return attn
