"""Pure scheduler decisions on real types."""

from __future__ import annotations

import pytest

from scheduler.partition import after_step, contiguous_prefill, decode_step
from scheduler.routing import resident_first
from scheduler.types import LayerReport, NodeId

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")


@pytest.mark.parametrize("n,k", [(37, 3), (5, 2), (2, 3), (1, 1), (64, 4)])
def test_contiguous_prefill_covers_every_token_once(n: int, k: int) -> None:
    tokens = list(range(100, 100 + n))
    plan = contiguous_prefill(tokens, [A, B, C][:k] if k <= 3 else [NodeId(str(i)) for i in range(k)])
    positions = [p for s in plan.shards for p in s.positions]
    assert positions == list(range(n))
    assert [t for s in plan.shards for t in s.token_ids] == tokens
    sizes = [len(s.positions) for s in plan.shards]
    assert max(sizes) - min(sizes) <= 1
    assert all(len(s.token_ids) == len(s.positions) for s in plan.shards)


def test_decode_goes_to_the_agent_with_fewest_kv_entries() -> None:
    plan = contiguous_prefill(list(range(7)), [A, B, C])  # 3, 2, 2
    cached = after_step(plan)
    assert cached == {A: 3, B: 2, C: 2}
    step = decode_step(1, 42, 7, cached)
    assert step.shards[0].node == B and step.shards[0].positions == (7,)
    assert after_step(step) == {A: 3, B: 3, C: 2}


def report(node: NodeId, counts: list[int], resident: set[int] = set(), loading: set[int] = set()) -> LayerReport:
    return LayerReport(node, tuple(counts), frozenset(resident), frozenset(loading))


def test_resident_expert_runs_where_it_is_resident() -> None:
    plan = resident_first(0, [report(A, [5, 0, 1]), report(B, [1, 2, 0], resident={0})])
    assert plan.shares[(A, 0)][0][0] == B and plan.shares[(B, 0)][0][0] == B


def test_missing_expert_runs_on_its_largest_owner() -> None:
    plan = resident_first(3, [report(A, [1, 4]), report(B, [3, 0]), report(C, [0, 5])])
    assert plan.layer == 3
    assert plan.shares[(A, 0)][0][0] == B and plan.shares[(B, 0)][0][0] == B
    assert plan.shares[(A, 1)][0][0] == C and plan.shares[(C, 1)][0][0] == C
    assert (B, 1) not in plan.shares  # B owns no token of expert 1


def test_loading_counts_as_resident_and_ties_go_to_the_first_agent() -> None:
    plan = resident_first(0, [report(A, [2, 2]), report(B, [2, 2], loading={1})])
    assert plan.shares[(B, 0)][0][0] == A  # tie between owners: first listed
    assert plan.shares[(A, 1)][0][0] == B  # already in flight on B


def test_dense_layer_has_an_empty_plan() -> None:
    assert resident_first(0, [report(A, [])]).shares == {}
