"""Split-KV attention: partial attentions over key blocks, merged, equal one causal softmax."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from node_agent.model import moe
from node_agent.state import KVShard

T, H, KVH, HD = 96, 8, 2, 16


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Plain masked softmax, K/V heads repeated to the query heads (h uses K/V head h // rep)."""
    rep = q.shape[1] // k.shape[1]
    kh, vh = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("thd,shd->hts", q.double(), kh.double()) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), vh.double()).float()


def zigzag(n: int, parts: int) -> list[torch.Tensor]:
    chunks = torch.arange(n).chunk(2 * parts)
    return [torch.cat([chunks[i], chunks[2 * parts - 1 - i]]) for i in range(parts)]


def contiguous(n: int, parts: int) -> list[torch.Tensor]:
    return list(torch.arange(n).chunk(parts))


def odd(n: int, parts: int) -> list[torch.Tensor]:
    """Runs that start and end off each other's edges, so the masked path runs too."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    return [torch.sort(p).values for p in order.chunk(parts)]


@pytest.mark.parametrize("split", [zigzag, contiguous, odd])
@pytest.mark.parametrize("parts", [1, 3, 4])
def test_merged_blocks_equal_one_causal_softmax_with_grouped_kv_heads(
    split: Callable[[int, int], list[torch.Tensor]], parts: int
) -> None:
    g = torch.Generator().manual_seed(parts)
    q, k, v = (torch.randn(T, n, HD, generator=g) for n in (H, KVH, KVH))
    for q_pos in split(T, parts):
        parts_ = [moe.attend(q[q_pos], k[k_pos], v[k_pos], q_pos, k_pos) for k_pos in split(T, parts)]
        out = moe.merge(parts_)
        expected = reference(q[q_pos], k, v, q_pos, torch.arange(T))
        assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()


def test_unmasked_attention_and_keys_no_query_can_see() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, n, HD, generator=g) for n in (H, KVH, KVH))
    out, _ = moe.attend(q, k, v)
    assert torch.allclose(out, reference(q, k, v, torch.full((8,), 10), torch.arange(8)), atol=1e-5)
    late, lse = moe.attend(q, k, v, torch.arange(8), torch.arange(8) + 100)  # every key after every query
    assert torch.equal(late, torch.zeros_like(late)) and bool(torch.isinf(lse).all())


@pytest.mark.parametrize("split", [zigzag, odd])
def test_peer_blocks_taken_as_one_union_give_the_same_attention(split: Callable[[int, int], list[torch.Tensor]]) -> None:
    """An agent attends to the peers' blocks that have arrived as one shard in position order:
    the result is the per-block merge's, and the zigzag blocks fuse into runs of positions."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(T, n, HD, generator=g) for n in (H, KVH, KVH))
    mine, *peers = split(T, 4)
    union = KVShard.union([KVShard(k[p], v[p], p) for p in peers])
    assert torch.equal(union.pos, torch.sort(torch.cat(peers)).values)
    assert torch.equal(union.k, k[union.pos]) and torch.equal(union.v, v[union.pos])
    own = moe.attend(q[mine], k[mine], v[mine], mine, mine)
    out = moe.merge([own, moe.attend(q[mine], union.k, union.v, mine, union.pos)])
    expected = reference(q[mine], k, v, mine, torch.arange(T))
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()


@pytest.mark.parametrize("parts", [2, 4])
def test_a_peer_gets_only_the_keys_it_can_see_and_attends_the_same(parts: int) -> None:
    torch.manual_seed(3)
    shards = zigzag(T, parts)
    q, k, v = torch.randn(T, H, HD), torch.randn(T, KVH, HD), torch.randn(T, KVH, HD)
    sizes = []
    for sender in shards:
        mine = KVShard(k[sender], v[sender], sender)
        for receiver in shards:
            if receiver is sender:
                continue
            sent = mine.visible_to(int(receiver.max()))
            assert bool((sent.pos <= receiver.max()).all())
            sizes.append(sent.pos.numel() / sender.numel())
            if sent.pos.numel():  # the receiver's queries see no key that was left out
                full = moe.attend(q[receiver], mine.k, mine.v, receiver, mine.pos)
                part = moe.attend(q[receiver], sent.k, sent.v, receiver, sent.pos)
                torch.testing.assert_close(part[0], full[0])
                torch.testing.assert_close(part[1], full[1])
    # Zigzag: an agent's late chunk is after every later agent's tokens, so half the blocks halve.
    assert sorted(sizes).count(0.5) == len(sizes) // 2 and sorted(sizes).count(1.0) == len(sizes) // 2
