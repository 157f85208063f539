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

from collections.abc import Collection, Mapping, Sequence

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
