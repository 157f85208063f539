"""The decoder math of Mixtral and Qwen3-MoE, written so distribution is applied from outside.

Every function works on the tokens it is given (a shard of a sequence) and takes their absolute
positions, so the same code serves one process, sequence-parallel prefill and a home agent's decode:
attention returns a partial output and its log-sum-exp over whatever keys it saw, and `merge`
combines partials exactly. Experts are weights looked up by expert index, never modules; which
tokens go through which expert, and how their outputs are added back, is `slots.py`.

Shapes: T new tokens, S keys, D hidden, H heads, KVH kv heads, hd head dim, E experts, k top-k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig

QUERY_BLOCK = 512  # query rows per attention block: bounds the [H, block, S] score matrix


@dataclass(frozen=True)
class ExpertWeights:
    gate: torch.Tensor  # [I, D]
    up: torch.Tensor  # [I, D]
    down: torch.Tensor  # [D, I]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))

    def units(self, start: int, stop: int) -> ExpertWeights:
        """The slice of intermediate units [start, stop) (views): gate and up rows, down columns.
        swiglu of the expert = the sum of swiglu of its slices (the down projection's columns
        split its sum; silu and the product act unit by unit)."""
        return ExpertWeights(self.gate[start:stop], self.up[start:stop], self.down[:, start:stop])


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor  # [D]
    q: torch.Tensor  # [H*hd, D]
    k: torch.Tensor  # [KVH*hd, D]
    v: torch.Tensor  # [KVH*hd, D]
    o: torch.Tensor  # [D, H*hd]
    q_norm: torch.Tensor | None  # [hd] (Qwen3)
    k_norm: torch.Tensor | None  # [hd] (Qwen3)
    post_norm: torch.Tensor  # [D]
    router: torch.Tensor | None  # [E, D]; None for a dense-MLP layer
    dense_mlp: ExpertWeights | None  # the MLP of a dense layer
    qkv: torch.Tensor | None = None  # [(H + 2 KVH) * hd, D]: q, k, v stacked (`stacked`; q, k, v are its views)
    qk_norm: torch.Tensor | None = None  # [H + KVH, hd]: q_norm for each query head, then k_norm for each K/V head

    def stacked(self) -> LayerWeights:
        """The same layer with q, k and v as views of one stacked matrix (no extra memory), for
        the few-row projection of `qkv_at`."""
        qkv = torch.cat([self.q, self.k, self.v])
        q, k, v = qkv.split([self.q.shape[0], self.k.shape[0], self.v.shape[0]])
        qk_norm = None
        if self.q_norm is not None and self.k_norm is not None:
            hd = self.q_norm.shape[0]
            qk_norm = torch.cat([self.q_norm.expand(self.q.shape[0] // hd, hd), self.k_norm.expand(self.k.shape[0] // hd, hd)])
        return replace(self, q=q, k=k, v=v, qkv=qkv, qk_norm=qk_norm)


@dataclass(frozen=True)
class DenseWeights:
    """Everything but the experts: loaded on every agent."""

    embed: torch.Tensor  # [V, D]
    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]


def load_dense(ckpt: Checkpoint, cfg: MoeConfig, dtype: torch.dtype, progress: Callable[[str], None] | None = None) -> DenseWeights:
    def get(name: str) -> torch.Tensor:
        return ckpt.read(name).to(dtype)

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        dense = None
        if not cfg.is_moe(i):
            dense = ExpertWeights(*(get(f"{p}.mlp.{n}_proj.weight") for n in ("gate", "up", "down")))
        layers.append(
            LayerWeights(
                input_norm=get(f"{p}.input_layernorm.weight"),
                q=get(f"{p}.self_attn.q_proj.weight"),
                k=get(f"{p}.self_attn.k_proj.weight"),
                v=get(f"{p}.self_attn.v_proj.weight"),
                o=get(f"{p}.self_attn.o_proj.weight"),
                q_norm=get(f"{p}.self_attn.q_norm.weight") if cfg.qk_norm else None,
                k_norm=get(f"{p}.self_attn.k_norm.weight") if cfg.qk_norm else None,
                post_norm=get(f"{p}.post_attention_layernorm.weight"),
                router=get(f"{cfg.prefix(i)}.gate.weight") if cfg.is_moe(i) else None,
                dense_mlp=dense,
            ).stacked()
        )
        if progress:
            progress(f"dense weights: layer {i + 1}/{cfg.num_layers}")
    embed = get("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_embeddings or "lm_head.weight" not in ckpt else get("lm_head.weight")
    return DenseWeights(embed, tuple(layers), get("model.norm.weight"), lm_head)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # one fused op, the same values
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * _normalized(x, eps)


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x over its root mean square (last dim), computed in float32 whatever the compute dtype, as
    the reference implementation does, and given back in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _head_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` of each head of x [T, heads, hd], head i scaled by weight[i] ([heads, hd]):
    the values `rms_norm` gives head by head with that head's weight row."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape[-1:], None, eps) * weight
    return weight * _normalized(x, eps)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, 1, hd] of the rotary embedding at absolute positions [T] (computed in float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [hd/2]
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of x [T, heads, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def qkv(w: LayerWeights, cfg: MoeConfig, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input norm + projections + (q/k norm) + RoPE. h [T, D] -> q [T,H,hd], k/v [T,KVH,hd]."""
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, h.dtype)
    return qkv_at(w, cfg, h, cos, sin)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [T,H,hd] over k/v [S,KVH,hd]; causal by positions when both given.

    Returns (out [T,H,hd], lse [T,H]); a query that sees no key gets out 0 and lse -inf, so it
    drops out of `merge`. Positions are split into runs of consecutive values (a contiguous shard
    is one run, a zigzag shard two) and each pair of runs is fully visible, a causal triangle, or
    invisible, so the fused kernel does the work; only oddly aligned runs take the masked path.
    The kernel reads head-major strided views, and with fewer K/V heads it maps query head h to
    K/V head h // (H / KVH) itself (grouped-query attention), so nothing is copied or expanded.
    """
    if q.device.type != "cpu" or q.shape[0] == 0 or k.shape[0] == 0:
        return _masked(q, k, v, q_pos, k_pos)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, tokens, hd] views
    if q_pos is None or k_pos is None:
        out, lse = _fused(qh, kh, vh, causal=False)
        return out.transpose(0, 1), lse.transpose(0, 1)
    outs, lses = [], []
    for qs in _runs(q_pos):
        a, b = int(q_pos[qs.start]), int(q_pos[qs.stop - 1])
        qr = qh[:, qs]
        parts = []
        for ks in _runs(k_pos):
            c, d = int(k_pos[ks.start]), int(k_pos[ks.stop - 1])
            if c > b:
                continue  # every key is after every query
            if d < a:
                parts.append(_fused(qr, kh[:, ks], vh[:, ks], causal=False))
                continue
            if c < a:  # the part before the queries is fully visible
                before = slice(ks.start, ks.start + (a - c))
                parts.append(_fused(qr, kh[:, before], vh[:, before], causal=False))
                c, ks = a, slice(before.stop, ks.stop)
            if c == a:  # aligned with the queries' start: a top-left causal triangle
                diag = slice(ks.start, ks.start + (min(d, b) - c + 1))
                parts.append(_fused(qr, kh[:, diag], vh[:, diag], causal=True))
            else:
                o, l = _masked(q[qs], k[ks], v[ks], q_pos[qs], k_pos[ks])
                parts.append((o.transpose(0, 1), l.transpose(0, 1)))
        if parts:
            out, lse = merge_lse(parts)
        else:
            out, lse = torch.zeros_like(qr), torch.full(qr.shape[:2], float("-inf"))
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1).transpose(0, 1), torch.cat(lses, dim=1).transpose(0, 1)


def _runs(pos: torch.Tensor) -> list[slice]:
    """Slices of maximal runs of consecutive positions (pos ascending within each run)."""
    if pos.numel() == 0:
        return []
    breaks = (torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist()
    edges = [0, *breaks, pos.numel()]
    return [slice(s, e) for s, e in zip(edges[:-1], edges[1:])]


def _fused(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU flash-attention kernel on head-major [H, t, hd] inputs; it also returns the
    log-sum-exp [H, t] that split-KV needs. A private aten op (public SDPA does not return the
    log-sum-exp); `_masked` is the portable fallback for other devices."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh[None], kh[None], vh[None], 0.0, causal)
    return out[0], lse[0].float()


def _masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor | None, k_pos: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with an arbitrary causal mask by positions, in query blocks."""
    T, H, hd = q.shape
    kvh = k.shape[1]
    rep = H // kvh
    scale = 1.0 / math.sqrt(hd)
    kt = k.permute(1, 2, 0)  # [KVH, hd, S]
    vt = v.permute(1, 0, 2)  # [KVH, S, hd]
    outs, lses = [], []
    for start in range(0, T, QUERY_BLOCK):
        qb = q[start : start + QUERY_BLOCK]  # [t, H, hd]
        t = qb.shape[0]
        qg = qb.view(t, kvh, rep, hd).permute(1, 2, 0, 3).reshape(kvh, rep * t, hd)  # [KVH, rep*t, hd]
        scores = torch.matmul(qg, kt).float() * scale  # [KVH, rep*t, S]
        scores = scores.view(kvh, rep, t, -1)
        if q_pos is not None and k_pos is not None:
            hidden = k_pos[None, :] > q_pos[start : start + t, None]  # [t, S]
            scores = scores.masked_fill(hidden, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [KVH, rep, t]
        probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows with no key: 0
        out = torch.matmul(probs.view(kvh, rep * t, -1).to(v.dtype), vt)  # [KVH, rep*t, hd]
        outs.append(out.view(kvh, rep, t, hd).permute(2, 0, 1, 3).reshape(t, H, hd))
        lses.append(lse.permute(2, 0, 1).reshape(t, H))
    return torch.cat(outs), torch.cat(lses)


def merge_lse(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial attentions over disjoint key sets: exact softmax over their union, and
    the union's log-sum-exp."""
    if len(parts) == 1:
        return parts[0]
    lse = torch.stack([p[1] for p in parts])  # [P, T, H]
    total = torch.logsumexp(lse, dim=0)  # [T, H]
    # [P, T, H, 1]; a part that saw no key: 0. Accumulated in place, no temporary per part
    # (0.18 against 0.30 ms for two parts of 512 queries on this project's CPU).
    weights = torch.exp(lse - total).nan_to_num_(0.0).unsqueeze(-1).to(parts[0][0].dtype)
    out = parts[0][0] * weights[0]
    for i in range(1, len(parts)):
        out.addcmul_(parts[i][0], weights[i])
    return out, total


def merge(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    return merge_lse(parts)[0]


class RopeTable:
    """cos/sin rows of the rotary embedding by position, computed once (as `rope_tables` does, so
    the values are the same) and grown by doubling as positions reach past it: a decode step then
    gathers rows instead of recomputing the table."""

    def __init__(self, head_dim: int, theta: float, dtype: torch.dtype, positions: int = 256) -> None:
        self.head_dim, self.theta, self.dtype = head_dim, theta, dtype
        self.cos, self.sin = rope_tables(torch.arange(positions), head_dim, theta, dtype)  # [P, 1, hd]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, hd] at positions [T]."""
        top = int(positions.max()) + 1 if positions.numel() else 0
        if top > self.cos.shape[0]:
            size = max(top, 2 * self.cos.shape[0])
            self.cos, self.sin = rope_tables(torch.arange(size), self.head_dim, self.theta, self.dtype)
        return self.cos[positions], self.sin[positions]


# Up to this many rows (decode steps), Q/K/V come from one matmul on the stacked weights, with one
# norm and one rotation over the query and key heads together: the same values (the same dot
# products, the same elementwise ops: equal bit for bit), in fewer ops. On one bench-model token,
# 66 against 88 us a layer with 2 threads, 103 against 122 with one; 32 rows 0.34 against 0.40
# ms. From about 64 rows on, the views' strides make the norm and the rotation cost more than the
# two matmuls saved (128 rows: 1.10 against 1.07 ms).
STACKED_QKV_ROWS = 32


def qkv_at(w: LayerWeights, cfg: MoeConfig, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`qkv` with the rotary tables given (cos, sin [T, 1, hd] from a `RopeTable`)."""
    x = rms_norm(h, w.input_norm, cfg.rms_eps)
    T = x.shape[0]
    if w.qkv is not None and T <= STACKED_QKV_ROWS:
        H, KVH = cfg.num_heads, cfg.num_kv_heads
        y = F.linear(x, w.qkv).view(T, H + 2 * KVH, cfg.head_dim)
        qk, v = y[:, :H + KVH], y[:, H + KVH:]
        if w.qk_norm is not None:
            qk = _head_norm(qk, w.qk_norm, cfg.rms_eps)
        qk = rope(qk, cos, sin)
        return qk[:, :H], qk[:, H:], v
    q = F.linear(x, w.q).view(T, cfg.num_heads, cfg.head_dim)
    k = F.linear(x, w.k).view(T, cfg.num_kv_heads, cfg.head_dim)
    v = F.linear(x, w.v).view(T, cfg.num_kv_heads, cfg.head_dim)
    if w.q_norm is not None and w.k_norm is not None:
        q, k = rms_norm(q, w.q_norm, cfg.rms_eps), rms_norm(k, w.k_norm, cfg.rms_eps)
    return rope(q, cos, sin), rope(k, cos, sin), v


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One decode query q [H, hd] over every key of its request's cache k/v [KVH, S, hd] (all of
    them precede it) -> [H, hd]. The kernel maps query heads to K/V heads itself (GQA)."""
    out = F.scaled_dot_product_attention(q[None, :, None], k[None], v[None], enable_gqa=k.shape[0] != q.shape[0])
    return out[0, :, 0]


def attention_output(w: LayerWeights, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """o_proj + residual. attn [T,H,hd] -> h [T,D]."""
    return h + F.linear(attn.reshape(attn.shape[0], -1), w.o)


def route(w: LayerWeights, cfg: MoeConfig, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router of a MoE layer on normed hidden x [T,D] -> (expert ids [T,k] int64, weights [T,k])."""
    assert w.router is not None
    logits = F.linear(x, w.router)  # [T, E]
    probs = torch.softmax(logits.float(), dim=-1)
    top_w, top_i = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_i, top_w.to(x.dtype)


def predicted_counts(w: LayerWeights, cfg: MoeConfig, hidden: torch.Tensor) -> list[int]:
    """Tokens per expert of the layer of `w`, its router applied to the previous layer's hidden
    states [T, D]: adjacent layers' hidden states are close, so this guesses which experts the
    tokens will need (speculative prefetch)."""
    ids, _ = route(w, cfg, rms_norm(hidden, w.post_norm, cfg.rms_eps))
    return torch.bincount(ids.flatten(), minlength=cfg.num_experts).tolist()


def swiglu(e: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """One SwiGLU MLP on x [n, D] -> [n, D]."""
    return F.linear(F.silu(F.linear(x, e.gate)) * F.linear(x, e.up), e.down)


def final_logits(dense: DenseWeights, cfg: MoeConfig, h: torch.Tensor) -> torch.Tensor:
    """Final norm + lm_head: h [T,D] -> logits [T,V] in float32."""
    return F.linear(rms_norm(h, dense.norm, cfg.rms_eps), dense.lm_head).float()
