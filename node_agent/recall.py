"""How well the speculative prefetch guessed: each layer's experts (and (token, slot) pairs) that
the previous layer's prediction named, against those the router then picked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class PredictionRecall:
    """Counters over an agent's own tokens, in layers that had a prediction."""

    predicted_used: int = 0  # experts used that the previous layer predicted
    used: int = 0  # experts used
    predicted_pairs_used: int = 0  # (token, slot) pairs whose expert the previous layer predicted
    pairs_used: int = 0  # (token, slot) pairs

    def score(self, predicted: frozenset[int], counts: Sequence[int]) -> None:
        """One layer: the predicted experts, and the router's tokens per expert."""
        used = {e for e, c in enumerate(counts) if c}
        self.used += len(used)
        self.predicted_used += len(used & predicted)
        # Per (token, slot) pair: a hot expert weighs by its tokens, a rarely used one by its few.
        self.pairs_used += sum(counts)
        self.predicted_pairs_used += sum(counts[e] for e in predicted)
