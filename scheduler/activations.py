"""Activation statistics: which experts the requests of each home agent choose, over a window.

Fed from what the homes already send back, with no call of its own: every decode step's reply
carries the experts each token of the step chose at each MoE layer (`DecodeResult.selections`,
[MoE layers, T, k]; the prompts a home prefills in its steps included). Per home it counts each
(token, expert) selection and each pair of experts a token chose together within a layer, in
buckets of `bucket_s` seconds; the window is the buckets that began less than `window_s` ago.
Pure bookkeeping: the caller passes the time. Placement reads the window as `Activations`, the
admin API as JSON. A step's selections are checked when they come and counted with later ones
(FOLD_TOKENS tokens at a time, or when the window is read): counted one step at a time, they
took about 0.8 ms of the scheduler's loop a step with 4 streams decoding, beside the agents on
the same cores.

Pairs are kept for a < b only, in a compact [layers, E(E-1)/2] table: 1.5 MB a bucket for
Qwen3-30B-A3B (48 layers, 128 experts) rather than 6.3 MB for the square.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from protos.ids import ExpertId, NodeId
from scheduler.placement.problem import Activations, entropy_bits


# Selections kept aside before they are counted: the ops of a count cost the same for one step's
# few tokens as for many steps' (see the module's docstring).
FOLD_TOKENS = 256


@dataclass
class _Bucket:
    start: float  # seconds, the caller's clock
    counts: torch.Tensor  # [L, E] int64 selections
    pairs: torch.Tensor  # [L, E(E-1)/2] int64 tokens that chose both experts of a pair (a < b)
    tokens: int = 0  # tokens seen (each selects k experts per layer)


@dataclass(frozen=True)
class HomeWindow:
    """One home's statistics summed over the window."""

    counts: torch.Tensor  # [L, E] int64
    pairs: torch.Tensor  # [L, E(E-1)/2] int64
    tokens: int


class ActivationWindow:
    def __init__(self, moe_layers: Sequence[int], num_experts: int, window_s: float = 300.0,
                 bucket_s: float = 60.0) -> None:
        if window_s <= 0 or not 0 < bucket_s <= window_s:
            raise ValueError(f"window_s must be > 0 and bucket_s in (0, window_s], got {window_s}, {bucket_s}")
        self.moe_layers = tuple(moe_layers)  # row l of a step's selections is layer moe_layers[l]
        self.num_experts = num_experts
        self.window_s, self.bucket_s = window_s, bucket_s
        self._homes: dict[NodeId, list[_Bucket]] = {}  # oldest bucket first
        self._pending: list[tuple[NodeId, torch.Tensor, float]] = []  # (home, ids [L, T, k], now) not yet counted
        self._pending_tokens = 0
        self.top_k: int | None = None  # experts a token chooses per layer, from the first selections
        E = num_experts
        a, b = torch.triu_indices(E, E, offset=1)  # the pair of each compact column
        self._pair_experts = (a.tolist(), b.tolist())

    @property
    def num_pairs(self) -> int:
        return self.num_experts * (self.num_experts - 1) // 2

    def add(self, home: NodeId, selections: torch.Tensor, now: float) -> None:
        """Take one step's selections [L, T, k] (expert ids) of requests homed on `home`: checked
        now, counted with later ones (FOLD_TOKENS) or when the window is read."""
        L, E = len(self.moe_layers), self.num_experts
        if selections.dim() != 3 or selections.shape[0] != L:
            raise ValueError(f"selections must be [{L} MoE layers, tokens, k], got {list(selections.shape)}")
        ids = selections.long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= E):
            raise ValueError(f"selections name experts outside [0, {E})")
        self.top_k = ids.shape[2]
        self._pending.append((home, ids, now))
        self._pending_tokens += ids.shape[1]
        if self._pending_tokens >= FOLD_TOKENS:
            self._fold()

    def _fold(self) -> None:
        """Count the selections kept aside: each run of steps of one home that fall in one bucket
        at once."""
        pending, self._pending, self._pending_tokens = self._pending, [], 0
        runs: list[tuple[NodeId, _Bucket, list[torch.Tensor]]] = []
        for home, ids, now in pending:
            bucket = self._bucket(home, now)
            if runs and runs[-1][0] == home and runs[-1][1] is bucket and runs[-1][2][0].shape[2] == ids.shape[2]:
                runs[-1][2].append(ids)
            else:
                runs.append((home, bucket, [ids]))
        for _, bucket, steps in runs:
            self._count(bucket, steps)

    def _count(self, bucket: _Bucket, run: list[torch.Tensor]) -> None:
        """Add steps' selections (each [L, T, k]) to `bucket`."""
        ids = torch.cat(run, dim=1)  # [L, T, k]
        L, E = ids.shape[0], self.num_experts
        rows = torch.arange(L).view(L, 1, 1)
        bucket.counts.view(-1).index_add_(0, (rows * E + ids).flatten(), torch.ones(ids.numel(), dtype=torch.long))
        k = ids.shape[2]
        for i in range(k):
            for j in range(i + 1, k):
                a, b = torch.minimum(ids[..., i], ids[..., j]), torch.maximum(ids[..., i], ids[..., j])  # [L, T]
                distinct = a != b
                col = a * E - a * (a + 1) // 2 + (b - a - 1)  # the compact column of pair (a, b)
                flat = (rows[..., 0] * self.num_pairs + col)[distinct]
                bucket.pairs.view(-1).index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.long))
        bucket.tokens += ids.shape[1]

    def _bucket(self, home: NodeId, now: float) -> _Bucket:
        self._prune(now)
        buckets = self._homes.setdefault(home, [])
        if not buckets or now - buckets[-1].start >= self.bucket_s:
            L, E = len(self.moe_layers), self.num_experts
            buckets.append(_Bucket(now, torch.zeros(L, E, dtype=torch.long),
                                   torch.zeros(L, self.num_pairs, dtype=torch.long)))
        return buckets[-1]

    def _prune(self, now: float) -> None:
        for home in list(self._homes):
            kept = [b for b in self._homes[home] if now - b.start < self.window_s]
            if kept:
                self._homes[home] = kept
            else:
                del self._homes[home]

    def window(self, now: float) -> dict[NodeId, HomeWindow]:
        """Each home's statistics over the window ending now."""
        self._fold()
        self._prune(now)
        out = {}
        for home, buckets in sorted(self._homes.items()):
            out[home] = HomeWindow(torch.stack([b.counts for b in buckets]).sum(0),
                                   torch.stack([b.pairs for b in buckets]).sum(0), sum(b.tokens for b in buckets))
        return out

    def activations(self, now: float) -> Activations:
        """The window as placement's input (nonzero entries only)."""
        counts: dict[NodeId, dict[ExpertId, float]] = {}
        pairs: dict[NodeId, dict[tuple[ExpertId, ExpertId], float]] = {}
        a_of, b_of = self._pair_experts
        for home, w in self.window(now).items():
            own, both = counts.setdefault(home, {}), pairs.setdefault(home, {})
            for l, e in w.counts.nonzero().tolist():
                own[ExpertId(self.moe_layers[l], e)] = float(w.counts[l, e])
            for l, col in w.pairs.nonzero().tolist():
                layer = self.moe_layers[l]
                both[(ExpertId(layer, a_of[col]), ExpertId(layer, b_of[col]))] = float(w.pairs[l, col])
        return Activations(counts, pairs)

    def to_json(self, now: float, top_pairs: int = 16) -> dict[str, Any]:
        """`GET /admin/stats`: per home and MoE layer, the selection counts of every expert, the
        histogram's entropy in bits, and the most frequent pairs."""
        a_of, b_of = self._pair_experts
        homes = {}
        for home, w in self.window(now).items():
            layers = []
            for l, layer in enumerate(self.moe_layers):
                counts = w.counts[l].tolist()
                top = torch.topk(w.pairs[l], min(top_pairs, self.num_pairs)) if self.num_pairs else None
                pairs = [] if top is None else [[a_of[c], b_of[c], n] for n, c in zip(top.values.tolist(),
                                                                                     top.indices.tolist()) if n > 0]
                layers.append({"layer": layer, "counts": counts, "entropy_bits": round(entropy_bits(counts), 4),
                               "top_pairs": pairs})
            homes[home] = {"tokens": w.tokens, "layers": layers}
        return {"window_s": self.window_s, "bucket_s": self.bucket_s, "num_experts": self.num_experts,
                "homes": homes}
