"""Dataset-free prefetch for decode (node_agent/decode_prefetch.py): the experts a request's own
prefill chose most, one per layer first, within free memory."""

from __future__ import annotations

import pytest

from node_agent.decode_prefetch import counts_of, plan
from protos.ids import ExpertId

COUNTS = {1: {0: 9, 3: 5, 5: 1}, 3: {2: 4, 7: 4, 1: 0}, 2: {6: 2}}


def test_one_per_layer_first_then_the_next_most_chosen() -> None:
    got = plan(COUNTS, held=frozenset(), free_slots=10)
    assert got == [ExpertId(1, 0), ExpertId(2, 6), ExpertId(3, 2),  # each layer's most chosen
                   ExpertId(1, 3), ExpertId(3, 7),  # then the second (3: a tie, the lower index first)
                   ExpertId(1, 5)]  # an expert no token chose (3: 1) is never read


def test_free_memory_bounds_it_and_held_experts_are_skipped() -> None:
    assert plan(COUNTS, held=frozenset(), free_slots=2) == [ExpertId(1, 0), ExpertId(2, 6)]
    held = frozenset({ExpertId(1, 0), ExpertId(2, 6)})
    assert plan(COUNTS, held, free_slots=3) == [ExpertId(1, 3), ExpertId(3, 2), ExpertId(1, 5)]
    assert plan(COUNTS, held, free_slots=0) == [] and plan({}, held, free_slots=4) == []


def test_counts_come_from_a_steps_selections() -> None:
    # 2 MoE layers (1 and 3), 3 tokens, top-2; -1 is a skipped slot.
    rows = [[[0, 3], [0, 5], [3, -1]], [[2, 7], [2, 7], [7, 2]]]
    assert counts_of(rows, [1, 3]) == {1: {0: 2, 3: 2, 5: 1}, 3: {2: 3, 7: 3}}
    with pytest.raises(ValueError, match="2 rows of selections for 1 MoE layers"):
        counts_of(rows, [1])
