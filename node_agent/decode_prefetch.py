"""Dataset-free prefetch for decode: which experts a home reads into free memory before a
request decodes, from the request's own prefill.

A prompt's tokens choose experts layer by layer; the experts its prefill chose most are the ones
its decode will most likely need again (the same topic, the same context). Before decode, the
home reads the most chosen of each layer that it does not hold: one per layer first (every
layer's likeliest miss costs a read; a second expert of one layer is worth less than the first
of another), then a second per layer, and so on while free memory lasts. No dataset, no
profile: the request's own counts. A miss still runs exactly (read on demand, or called on a
holder); a prefetch only moves the read ahead.

    counts (layer -> expert -> selections in the prefill) + what the home holds + free slots
      -> plan(...) = the experts to read, in order
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence

import torch

from node_agent.expert_buffer import ExpertBuffer
from protos.ids import ExpertId


def plan(counts: Mapping[int, Mapping[int, int]], held: Collection[ExpertId], free_slots: int) -> list[ExpertId]:
    """The experts to read before decode, at most `free_slots`: round r takes, in every layer
    (in layer order), the r-th most chosen expert the home does not hold; an expert chosen by no
    token is never read. Ties go to the lower index."""
    if free_slots <= 0:
        return []
    ranked = {layer: [ExpertId(layer, e) for e, c in sorted(by.items(), key=lambda x: (-x[1], x[0]))
                      if c > 0 and ExpertId(layer, e) not in held]
              for layer, by in sorted(counts.items())}  # fmt: skip
    out: list[ExpertId] = []
    for r in range(max((len(r) for r in ranked.values()), default=0)):
        for layer in sorted(ranked):
            if r < len(ranked[layer]):
                out.append(ranked[layer][r])
                if len(out) == free_slots:
                    return out
    return out


def counts_of(selections: Sequence[Sequence[Sequence[int]]], layers: Sequence[int]) -> dict[int, dict[int, int]]:
    """Per MoE layer, how often each expert was chosen, from a step's selections ([MoE layers]
    [tokens][k] expert ids, -1 for a skipped slot, as `DecodeStepReply.selections` lists them);
    `layers` names the MoE layer of each row."""
    if len(selections) != len(layers):
        raise ValueError(f"{len(selections)} rows of selections for {len(layers)} MoE layers")
    out: dict[int, dict[int, int]] = {}
    for layer, tokens in zip(layers, selections):
        by = out.setdefault(layer, {})
        for chosen in tokens:
            for e in chosen:
                if e >= 0:
                    by[e] = by.get(e, 0) + 1
    return out


class HomePrefetch:
    """The home's side of the plan: counts the selections of each prompt it prefills itself (in
    its decode steps' spans), reads the plan's experts as the prompt's last span ends (PREFETCH
    priority: after demand reads, before fills) into free memory, and
    counts, for the request's decode tokens, hits (a selection of an expert the prefetch read)
    against misses (a selection of one the home did not hold when the plan was made, nor read).
    A prompt prefilled sequence-parallel elsewhere has no counts here and no prefetch."""

    def __init__(self, buffer: ExpertBuffer, moe_layers: Sequence[int], num_experts: int) -> None:
        self.buffer, self.layers, self.num_experts = buffer, list(moe_layers), num_experts
        self.enabled = True  # the routing table's `decode_prefetch` (--no-decode-prefetch)
        self._counts: dict[str, dict[int, dict[int, int]]] = {}  # request -> layer -> expert -> selections
        self._planned: dict[str, tuple[frozenset[ExpertId], frozenset[ExpertId]]] = {}  # request -> (read, held)
        self._reads: set[asyncio.Task[bool]] = set()
        self.read = 0  # experts the plans queued
        self.hits = 0  # decode selections of an expert its request's prefetch read
        self.misses = 0  # decode selections of one neither held when planned nor read

    def prompt(self, request_id: str, chosen: Sequence[torch.Tensor], rows: slice = slice(None)) -> None:
        """Count a prompt span's selections: `rows` of each MoE layer's [T, k] (a step's tokens)."""
        if not self.enabled:
            return
        counts = self._counts.setdefault(request_id, {})
        for layer, ids in zip(self.layers, chosen):
            by, ids = counts.setdefault(layer, {}), ids[rows]
            for e, c in enumerate(torch.bincount(ids[ids >= 0].flatten().long()).tolist()):
                if c:
                    by[e] = by.get(e, 0) + c

    def counted(self, request_id: str, flat: Sequence[int]) -> None:
        """A prompt prefilled elsewhere (sequence-parallel): its selections per (MoE layer,
        expert), flat in layer order, as the scheduler summed them; the plan is read now.
        ValueError for a list that is not MoE layers x experts, or has a negative count."""
        if not self.enabled:
            return
        E = self.num_experts
        if len(flat) != E * len(self.layers) or min(flat) < 0:
            raise ValueError(f"prompt_counts: expected {len(self.layers)} MoE layers x {E} experts of non-negative "
                             f"counts, got {len(flat)} values")
        self._counts[request_id] = {layer: {e: c for e, c in enumerate(flat[i * E:(i + 1) * E]) if c}
                                    for i, layer in enumerate(self.layers)}  # fmt: skip
        self.prompt_done(request_id)

    def prompt_done(self, request_id: str) -> None:
        """The prompt is in: read the plan's experts into free memory, that is memory no whole
        expert takes (empty, or slices), less one slot for demand reads. Whole experts stay: in
        a full pool each may be the one copy the routing table sends every home to, and evicting
        it sends them to a holder that must read it again."""
        counts = self._counts.pop(request_id, None)
        if not self.enabled or counts is None:
            return
        held = frozenset(self.buffer.all_resident()) | frozenset(self.buffer.all_loading())
        if self.buffer.capacity:
            free = (self.buffer.capacity - len(held) * self.buffer.expert_nbytes) // self.buffer.expert_nbytes - 1
        else:
            free = sum(len(c) for c in counts.values())
        chosen = plan(counts, held, free)
        self._planned[request_id] = (frozenset(chosen), held)
        self.read += len(chosen)
        for eid in chosen:
            task = asyncio.get_running_loop().create_task(self.buffer.prefetch(eid, evict_whole=False))
            self._reads.add(task)
            task.add_done_callback(self._reads.discard)

    def decoded(self, request_id: str, chosen: Sequence[torch.Tensor], rows: slice = slice(None)) -> None:
        """Count a decode token's selections (`rows` of each MoE layer's [T, k]) as hits or
        misses. A request without a plan (prefetch off) costs one dict lookup a step."""
        planned = self._planned.get(request_id)
        if planned is None:
            return
        read, held = planned
        for layer, ids in zip(self.layers, chosen):
            for e in ids[rows].flatten().tolist():
                eid = ExpertId(layer, e)
                if eid in read:
                    self.hits += 1
                elif e >= 0 and eid not in held:
                    self.misses += 1

    def release(self, request_id: str) -> None:
        self._counts.pop(request_id, None)
        self._planned.pop(request_id, None)
