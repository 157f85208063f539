"""Weighted experts over (token, slot) pairs: an owner's routed tokens grouped by expert so each
expert runs one matmul chain on its rows, for a whole batch (`mix_experts`, decode's few rows;
`add_experts`, `run_experts`) or for several batches at once (`SlotGroups`, `run_expert`,
`expert_slots`: the grouped passes of node_agent/grouped.py). The expert math itself is
`moe.swiglu`; this module only decides which rows go through which expert and adds them back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from node_agent.model.moe import ExpertWeights, swiglu


def with_rows(h: torch.Tensor, done: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """h [T, D] plus outputs computed elsewhere: each (rows [m], out [m, D]) added at its rows."""
    if not done:
        return h
    h = h.clone()
    for rows, out in done:
        h.index_add_(0, rows, out.to(h.dtype))
    return h


def mix_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: Mapping[int, ExpertWeights]
                ) -> torch.Tensor | None:
    """Weighted sum [n, D] of the experts in `experts` over the (token, slot) pairs of ids [n, k]
    that name them, or None if none does. For decode's few rows: the pairs are grouped in Python
    (cheaper than `SlotGroups` on a handful of ints), one matmul chain per expert.

    An expert with one pair (most, in decode) runs on views: its row and weight sliced, its
    output added in place. The index tensors, gather and index_add of the general case cost 40
    us a step's expert beside the matmuls' own (one thread), the same sums in the same order."""
    k = ids.shape[1]
    slots: dict[int, list[int]] = {}
    for i, e in enumerate(ids.flatten().tolist()):
        if e in experts:
            slots.setdefault(e, []).append(i)
    if not slots:
        return None
    out = torch.zeros_like(x)
    flat_w = weights.reshape(-1)
    for e, pairs in slots.items():
        if len(pairs) == 1:
            i = pairs[0]
            row = slice(i // k, i // k + 1)
            out[row] += swiglu(experts[e], x[row]) * flat_w[i:i + 1, None]
        else:
            rows = torch.tensor([i // k for i in pairs])
            out.index_add_(0, rows, swiglu(experts[e], x[rows]) * flat_w[torch.tensor(pairs)][:, None])
    return out


def add_experts(out: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                experts: Mapping[int, ExpertWeights]) -> None:
    """out += routing weight * expert(x) for every (token, slot) of ids [n,k] whose expert is in
    `experts` (others are skipped). Slots are grouped by expert so each expert runs one matmul
    on a contiguous block, and results go back with one index_add."""
    slots = expert_slots([(x, ids, weights)], experts)[0]
    if slots.rows.numel():
        out.index_add_(0, slots.rows, slots.y)


@dataclass(frozen=True)
class SlotOutputs:
    """Weighted expert outputs of a batch's (token, slot) pairs, one row per slot and kept apart
    by expert, so that a caller can add only some experts' share to the residual stream."""

    rows: torch.Tensor  # [m] token row of each slot
    experts: torch.Tensor  # [m] expert index of each slot
    y: torch.Tensor  # [m, D] routing weight * expert(x[row])

    @staticmethod
    def cat(parts: Sequence[SlotOutputs], x: torch.Tensor) -> SlotOutputs:
        """One batch's slot outputs from several runs over disjoint experts (x: the batch's
        tokens, which give an empty result its width)."""
        if not parts:
            none = torch.empty(0, dtype=torch.long)
            return SlotOutputs(none, none, x.new_empty(0, x.shape[1]))
        if len(parts) == 1:
            return parts[0]
        return SlotOutputs(torch.cat([p.rows for p in parts]), torch.cat([p.experts for p in parts]),
                           torch.cat([p.y for p in parts]))

    def only(self, keep: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, y) of the slots whose expert is in keep."""
        mask = torch.isin(self.experts, torch.tensor(list(keep), dtype=self.experts.dtype))
        return self.rows[mask], self.y[mask]


@dataclass(frozen=True)
class SlotGroups:
    """A batch's (token, slot) pairs for some experts, sorted by expert, with each expert's span:
    grouped once, so that a pass can run the experts one at a time without regrouping."""

    rows: torch.Tensor  # [m] token row of each slot
    experts: torch.Tensor  # [m] expert index of each slot (ascending)
    weights: torch.Tensor  # [m, 1] routing weight of each slot
    spans: dict[int, tuple[int, int]]  # expert -> (start, count) of its slots

    @classmethod
    def of(cls, ids: torch.Tensor, weights: torch.Tensor, experts: Iterable[int]) -> SlotGroups:
        k = ids.shape[1]
        flat = ids.flatten()  # [n*k]
        slots = torch.isin(flat, torch.tensor(sorted(experts), dtype=torch.long)).nonzero().flatten()
        slots = slots[torch.argsort(flat[slots], stable=True)]  # grouped by expert id
        counts = torch.bincount(flat[slots]).tolist() if slots.numel() else []
        spans, start = {}, 0
        for e, c in enumerate(counts):
            if c:
                spans[e] = (start, c)
                start += c
        return cls(slots // k, flat[slots], weights.flatten()[slots, None], spans)


def run_expert(e: ExpertWeights, members: Sequence[tuple[torch.Tensor, SlotGroups]], index: int) -> list[SlotOutputs]:
    """Expert `index` on its slots of every (x, groups) member, one matmul over all their rows;
    each member's weighted outputs, one row per slot."""
    parts = [(x, g, *g.spans[index]) for x, g in members]
    xs = [x[g.rows[s : s + c]] for x, g, s, c in parts]
    y = swiglu(e, xs[0] if len(xs) == 1 else torch.cat(xs))
    out, done = [], 0
    for _, g, s, c in parts:
        out.append(SlotOutputs(g.rows[s : s + c], g.experts[s : s + c], y[done : done + c] * g.weights[s : s + c]))
        done += c
    return out


def expert_slots(batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 experts: Mapping[int, ExpertWeights]) -> list[SlotOutputs]:
    """The slot outputs of every (x, ids, weights) batch for its slots whose expert is in
    `experts`, each expert running one matmul over its rows from all the batches."""
    members = [(x, SlotGroups.of(ids, weights, experts)) for x, ids, weights in batches]
    per_batch: list[list[SlotOutputs]] = [[] for _ in members]
    for index in sorted(experts):
        having = [i for i, (_, g) in enumerate(members) if index in g.spans]
        if having:
            for i, part in zip(having, run_expert(experts[index], [members[i] for i in having], index)):
                per_batch[i].append(part)
    return [SlotOutputs.cat(parts, x) for parts, (x, _) in zip(per_batch, members)]


def run_experts(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert: Callable[[int], ExpertWeights]
) -> torch.Tensor:
    """Weighted sum of the experts named in ids [n,k] (slots with -1 are skipped) on x [n,D]."""
    out = torch.zeros_like(x)
    add_experts(out, x, ids, weights, {int(i): expert(int(i)) for i in torch.unique(ids[ids >= 0]).tolist()})
    return out
