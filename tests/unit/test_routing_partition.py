"""Pure scheduler decisions on real types."""

from __future__ import annotations

import random

import pytest

import scheduler.balance
from protos.ids import ExpertId, SliceId
from scheduler.cost_model import AgentProfile, CostModel
from scheduler.decode_plan import (SEQUENCE_PARALLEL_OVERHEAD_S, Measured, RunsMemo, choose_home, home_runs,
                                   prefill_at_home, routing_table, same_holders, user_home)
from scheduler.partition import after_step, chunk_step, contiguous_prefill, zigzag_prefill
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


def test_prompt_chunks_follow_one_another_with_the_kv_each_agent_holds() -> None:
    tokens = list(range(100, 110))
    first = chunk_step(zigzag_prefill(tokens[:6], [A, B]), 0, 0, {})
    cached = after_step(first)
    second = chunk_step(zigzag_prefill(tokens[6:], [A, B]), 6, 1, cached)
    assert second.step == 1 and second.cached == {A: 3, B: 3}
    positions = sorted(p for plan in (first, second) for s in plan.shards for p in s.positions)
    assert positions == list(range(10))  # every position once, in absolute terms
    assert {t for s in second.shards for t, p in zip(s.token_ids, s.positions)} == {tokens[p] for p in range(6, 10)}
    assert all(tokens[p] == t for s in second.shards for t, p in zip(s.token_ids, s.positions))


def test_short_prompts_on_a_warm_pool_are_prefilled_on_their_home() -> None:
    assert prefill_at_home(128, 256, 4, 0.0)
    assert prefill_at_home(256, 256, 4, 0.0) and not prefill_at_home(257, 256, 4, 0.0)
    assert not prefill_at_home(1, 0, 4, 0.0)  # 0: every prompt sequence-parallel
    # Experts no agent holds: spreading their reads over 4 disks saves 3/4 of the home's read time.
    limit = SEQUENCE_PARALLEL_OVERHEAD_S / 0.75
    assert prefill_at_home(128, 256, 4, 0.99 * limit) and not prefill_at_home(128, 256, 4, 1.01 * limit)
    assert prefill_at_home(128, 256, 1, 100.0)  # one agent reads them all either way


def test_home_joins_the_largest_open_batch_then_holds_most_kv() -> None:
    assert choose_home([A, B, C], {A: 1}, {A: 5, B: 2, C: 3}) == A  # batched with the one decoding
    assert choose_home([A, B, C], {}, {A: 2, B: 2, C: 3}) == C  # none decodes: the most K/V
    assert choose_home([A, B, C], {}, {A: 2, B: 2, C: 2}) == A  # ties: the first in order
    assert choose_home([A, B], {A: 2, B: 3}, {}, batch=3) == A  # B's batch is full
    assert choose_home([A, B], {A: 3, B: 3}, {}, batch=3) == A  # all full: the fewest, then order
    with pytest.raises(ValueError):
        choose_home([], {}, {})


def test_a_users_home_comes_before_load() -> None:
    assert choose_home([A, B, C], {A: 1}, {A: 5}, preferred=C) == C
    assert choose_home([A, B], {A: 1}, {A: 5}, preferred=C) == A  # C is not up: by load


def test_user_homes_are_listed_or_sticky_and_move_only_off_a_leaving_agent() -> None:
    nodes = [NodeId(n) for n in "abcd"]
    assert user_home(None, nodes, {}) is None and user_home("", nodes, {}) is None
    assert user_home("alice", nodes, {NodeId("c"): ("alice",)}) == NodeId("c")
    users = [f"user{i}" for i in range(400)]
    homes = {u: user_home(u, nodes, {}) for u in users}
    assert homes == {u: user_home(u, list(reversed(nodes)), {}) for u in users}  # not by order
    counts = {n: sum(h == n for h in homes.values()) for n in nodes}
    assert min(counts.values()) > 60, counts  # spread over the agents (100 each on average)
    without_c = {u: user_home(u, [n for n in nodes if n != "c"], {}) for u in users}
    assert all(without_c[u] == homes[u] for u in users if homes[u] != "c")
    assert all(without_c[u] != "c" for u in users)


def test_routing_table_lists_every_holder_and_rotates_the_preferred_one() -> None:
    held = {A: frozenset({ExpertId(0, 0), ExpertId(0, 1)}), B: frozenset({ExpertId(0, 0), ExpertId(0, 1)}),
            C: frozenset({ExpertId(1, 3)})}
    table = routing_table(7, {A: "a:1", B: "b:1", C: "c:1", NodeId("gone"): "g:1"}, held)
    assert table.version == 7 and set(table.addresses) == {A, B, C}
    assert table.holders[ExpertId(0, 0)] == (A, B) and table.holders[ExpertId(0, 1)] == (B, A)
    assert table.remote_holder(ExpertId(0, 1), B) == A  # never the asking agent itself
    assert table.remote_holder(ExpertId(1, 3), C) is None and table.remote_holder(ExpertId(1, 2), A) is None
    assert same_holders(table, routing_table(8, {A: "a:1", B: "b:1", C: "c:1"}, held))
    assert not same_holders(table, routing_table(8, {A: "a:1", B: "b:1"}, {A: held[A], B: held[B]}))


BENCH_EXPERT = CostModel(expert_bytes=4_718_592, token_bytes=2048, flops_per_token=2.0 * 3 * 512 * 768)


def profiles(disk: float) -> dict[NodeId, AgentProfile]:
    return {n: AgentProfile(n, disk, 125e6, 10e9, None) for n in (A, B, C)}


def test_home_runs_split_what_a_home_would_read_slowly_and_nothing_it_holds() -> None:
    experts = [ExpertId(1, i) for i in range(3)]
    held = {A: frozenset({ExpertId(1, 0)}), B: frozenset({ExpertId(1, 1)})}
    lan = {n: 0.001 for n in (A, B, C)}
    splits = home_runs(profiles(50e6), lan, {}, BENCH_EXPERT, experts, held, {}, "auto")  # 94 ms reads
    assert splits == {n: {ExpertId(1, 2): (A, B, C)} for n in (A, B, C)}  # the held ones run whole on their holders
    always = home_runs(profiles(50e6), lan, {}, BENCH_EXPERT, experts, held, {}, "always")
    assert set(always[A]) == {ExpertId(1, 1), ExpertId(1, 2)} and set(always[B]) == {ExpertId(1, 0), ExpertId(1, 2)}
    assert home_runs(profiles(50e6), lan, {}, BENCH_EXPERT, experts, held, {}, "never") == {}
    only = {A: AgentProfile(A, 50e6, 125e6, 10e9, None)}
    assert home_runs(only, lan, {}, BENCH_EXPERT, experts, held, {}, "auto") == {}  # one agent: nothing to split


def test_home_runs_weigh_measured_reads_and_round_trips() -> None:
    unheld = [ExpertId(1, 2)]
    # Unthrottled disks read at the measured pace: 94 ms a read splits, a page-cached 1 ms does not.
    slow = {n: Measured(expert_read_s=0.094, round_trip_s=0.002) for n in (A, B, C)}
    assert home_runs(profiles(0.0), {}, slow, BENCH_EXPERT, unheld, {}, {}, "auto")[A] == {unheld[0]: (A, B, C)}
    cached = {n: Measured(expert_read_s=0.001, round_trip_s=0.002) for n in (A, B, C)}
    assert home_runs(profiles(0.0), {}, cached, BENCH_EXPERT, unheld, {}, {}, "auto") == {A: {}, B: {}, C: {}}
    # A home whose calls take 80 ms reads a 94 ms expert itself; the others still split it.
    busy = {**slow, A: Measured(expert_read_s=0.094, round_trip_s=0.08)}
    splits = home_runs(profiles(0.0), {}, busy, BENCH_EXPERT, unheld, {}, {}, "auto")
    assert splits[A] == {} and splits[B] == {unheld[0]: (A, B, C)}


def test_home_runs_with_a_memo_answer_as_from_nothing_and_reuse_what_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(7)
    nodes = [NodeId(f"n{i}") for i in range(4)]
    experts = [ExpertId(layer, e) for layer in range(4) for e in range(16)]
    disks = {n: AgentProfile(n, d, 125e6, 10e9, None) for n, d in zip(nodes, (50e6, 200e6, 200e6, 400e6))}
    lan = {n: 0.001 for n in nodes}
    calls = []
    real = scheduler.balance.balance
    monkeypatch.setattr(scheduler.balance, "balance", lambda *a, **k: calls.append(1) or real(*a, **k))
    memo = RunsMemo()
    for poll in range(6):  # holdings and slices change between polls, the round trips jitter
        held = {n: frozenset(rnd.sample(experts, 12)) for n in nodes}
        slices = {n: frozenset(SliceId(e, rnd.randrange(2), 2) for e in rnd.sample(experts, 6)) for n in nodes}
        measured = {n: Measured(0.0, 0.004 * rnd.uniform(0.9, 1.1)) for n in nodes}
        got = home_runs(disks, lan, measured, BENCH_EXPERT, experts, held, slices, "auto", memo)
        assert got == home_runs(disks, lan, memo.measured, BENCH_EXPERT, experts, held, slices, "auto")
    calls.clear()
    assert home_runs(disks, lan, measured, BENCH_EXPERT, experts, held, slices, "auto", memo) == got
    assert not calls  # nothing new: every answer reused
    moved = {n: Measured(0.0, 0.02) for n in nodes}  # the round trips moved past STEADY_SHARE: worked out anew
    assert home_runs(disks, lan, moved, BENCH_EXPERT, experts, held, slices, "auto", memo) == home_runs(
        disks, lan, moved, BENCH_EXPERT, experts, held, slices, "auto")
    assert memo.measured == moved and calls


def test_runs_memo_keeps_a_measured_pace_that_moved_little() -> None:
    memo = RunsMemo()
    assert memo.steady({A: Measured(0.1, 0.004)}) == {A: Measured(0.1, 0.004)}
    assert memo.steady({A: Measured(0.11, 0.0049)}) == {A: Measured(0.1, 0.004)}  # within 25%: kept
    assert memo.steady({A: Measured(0.2, 0.0049)}) == {A: Measured(0.2, 0.004)}  # the read moved: taken
    assert memo.steady({A: Measured(0.2, 0.0), B: Measured(0.0, 0.003)}) == {A: Measured(0.2, 0.0), B: Measured(0.0, 0.003)}


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
