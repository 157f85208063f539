"""The token scheduler and the prefill policies, on real types (pure functions)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from node_agent.dispatch import LayerPlan, split_by_executor
from protos.ids import ExpertId
from scheduler.cost_model import AgentProfile, CostModel, lower_bound_s
from scheduler.partition import causal_work, contiguous_prefill, zigzag_prefill
from scheduler.policy import Policy
from scheduler.token_scheduling import schedule_layer
from scheduler.types import LayerReport, NodeId

NODES = [NodeId(f"n{i}") for i in range(4)]
COST = CostModel(expert_bytes=4_000_000, token_bytes=2048, flops_per_token=4.7e6)


def profiles(n: int, disk: float = 50e6, capacity: int | None = 32) -> dict[NodeId, AgentProfile]:
    return {node: AgentProfile(node, disk, 125e6, 20e9, capacity) for node in NODES[:n]}


def report(node: NodeId, counts: list[int], resident: set[int] = set(), total: int = 0) -> LayerReport:
    return LayerReport(node, tuple(counts), frozenset(resident), frozenset(), resident_total=total)


def executors(plan) -> dict[int, set[NodeId]]:  # type: ignore[no-untyped-def]
    out: dict[int, set[NodeId]] = {}
    for (_, e), shares in plan.shares.items():
        out.setdefault(e, set()).update(x for x, _ in shares)
    return out


def test_cold_layer_spreads_disk_reads_evenly_across_agents() -> None:
    reports = [report(n, [32] * 16) for n in NODES]
    plan = schedule_layer(0, reports, profiles(4), COST)
    where = executors(plan)
    assert all(len(x) == 1 for x in where.values())  # each expert read once, on one agent
    per_agent = Counter(next(iter(x)) for x in where.values())
    assert sorted(per_agent.values()) == [4, 4, 4, 4]


def test_cold_layer_with_uneven_experts_also_spreads_their_tokens() -> None:
    # Reads set the makespan (4 per agent either way); among equal reads the tokens are spread,
    # since the experts placed now are where warm requests will run them.
    counts = [400, 300, 200, 100, 100, 100, 60, 40]
    reports = [report(n, [c // 4 for c in counts]) for n in NODES]
    where = executors(schedule_layer(0, reports, profiles(4), COST))
    tokens = Counter()
    for e, x in where.items():
        tokens[next(iter(x))] += counts[e]
    assert sorted(Counter(next(iter(x)) for x in where.values()).values()) == [2, 2, 2, 2]
    assert max(tokens.values()) <= 460  # best split: 460/440/... ; unbalanced ties would give 700


def test_resident_expert_runs_where_it_is_and_a_missing_one_goes_to_its_big_owner() -> None:
    reports = [report(NODES[0], [10, 0, 9]), report(NODES[1], [1, 5, 0], resident={0})]
    plan = schedule_layer(0, reports, profiles(2), COST)
    assert plan.shares[(NODES[0], 0)] == ((NODES[1], 0),)
    assert plan.shares[(NODES[0], 2)] == ((NODES[0], 0),)  # no transfer when the owner loads it


def test_expert_held_by_several_agents_has_its_tokens_split() -> None:
    reports = [report(n, [100, 0], resident={0}) for n in NODES[:3]]
    plan = schedule_layer(0, reports, profiles(3), COST)
    assert len(executors(plan)[0]) == 3  # every holder runs its own owner's tokens: nothing moves
    assert all(plan.shares[(n, 0)] == ((n, 0),) for n in NODES[:3])


def test_an_owner_holding_the_expert_keeps_its_tokens_and_the_others_go_to_the_idlest_holder() -> None:
    # Expert 1 (only n0 holds it) keeps n0 busy, so balancing alone would send n0's tokens of
    # expert 0 to the idle n1, which holds it too. But n0 ran them already (agents start their
    # own tokens on held experts before the plan comes): n0 keeps its own; n2's go to n1.
    reports = [report(NODES[0], [300, 400], resident={0, 1}), report(NODES[1], [0, 0], resident={0}),
               report(NODES[2], [100, 0])]
    plan = schedule_layer(0, reports, profiles(3), COST)
    assert plan.shares[(NODES[0], 0)] == ((NODES[0], 0),)
    assert plan.shares[(NODES[0], 1)] == ((NODES[0], 0),)
    assert plan.shares[(NODES[2], 0)] == ((NODES[1], 0),)


def test_a_full_buffer_is_avoided_when_it_costs_nothing() -> None:
    reports = [report(NODES[0], [1, 0], total=32), report(NODES[1], [1, 0], total=0)]
    plan = schedule_layer(0, reports, profiles(2), COST)
    assert plan.shares[(NODES[0], 0)][0][0] == NODES[1]


def test_naive_runs_every_expert_on_its_owner_and_expert_parallel_on_a_fixed_agent() -> None:
    reports = [report(n, [3] * 8) for n in NODES]
    naive = Policy.from_flags("naive").route(0, reports, profiles(4), COST, 8)
    assert naive.shares == {}  # absent = runs on the owner
    ep = Policy.from_flags("expert-parallel").route(0, reports, profiles(4), COST, 8)
    assert {e: x for e, x in executors(ep).items()} == {e: {NODES[e // 2]} for e in range(8)}


def test_prefetch_follows_the_predicted_plan_and_skips_what_is_held() -> None:
    reports = [
        LayerReport(n, (1,) * 4, frozenset(), frozenset(), predicted=(8, 8, 8, 8), next_resident=frozenset({i}))
        for i, n in enumerate(NODES[:2])
    ]
    pre = Policy.from_flags("sirius").prefetches(1, reports, profiles(2), COST, 4)
    assert set(pre.get(NODES[0], ())) | set(pre.get(NODES[1], ())) == {2, 3}
    assert 0 not in pre.get(NODES[0], ()) and 1 not in pre.get(NODES[1], ())
    assert Policy.from_flags("sirius", no_prefetch=True).prefetches(1, reports, profiles(2), COST, 4) == {}


def test_prefetch_evicts_only_when_the_agent_computes_longer_than_a_read() -> None:
    # COST reads an expert in 0.08 s at 50 MB/s; one (token, expert) pair computes in 0.235 ms.
    predicted = (1, 9, 2, 8, 3, 7, 4, 6)

    def reports(total: int, attention_s: float = 0.0, pairs: int = 0) -> list[LayerReport]:
        return [LayerReport(n, (pairs,) + (0,) * 7, frozenset(), frozenset(), attention_s, predicted, total) for n in NODES[:2]]

    def plan(rs: list[LayerReport], capacity: int | None = 32) -> dict[NodeId, tuple[int, ...]]:
        return Policy().prefetches(1, rs, profiles(2, capacity=capacity), COST, 8)

    everything = plan(reports(0))
    assert sorted(e for es in everything.values() for e in es) == list(range(8))  # free memory: read all
    # Memory full and less compute than one read between layers: a prefetch would only cost reads.
    assert plan(reports(32)) == {}
    assert plan(reports(32, attention_s=0.05, pairs=100)) == {}  # 0.074 s
    short = plan(reports(31, attention_s=0.05))  # one free slot: the surest guess goes there
    for node, es in short.items():
        assert list(es) == sorted(everything[node], key=lambda e: -predicted[e])[:1]
    assert len(short) == 2
    # A compute window of a read or more: the whole predicted layer, evicting.
    assert plan(reports(32, attention_s=0.08)) == everything
    assert plan(reports(32, pairs=341)) == everything  # 0.080 s of expert compute
    assert plan(reports(32), capacity=None) == everything  # unlimited memory evicts nothing


@pytest.mark.parametrize("n,k", [(2048, 2), (2048, 4), (4096, 4), (513, 3)])
def test_zigzag_covers_every_token_once_and_balances_causal_work(n: int, k: int) -> None:
    plan = zigzag_prefill(list(range(n)), NODES[:k])
    positions = sorted(p for s in plan.shards for p in s.positions)
    assert positions == list(range(n))
    work = causal_work(plan)
    assert max(work.values()) / (sum(work.values()) / k) <= 1.01
    contiguous = causal_work(contiguous_prefill(list(range(n)), NODES[:k]))
    assert max(contiguous.values()) / (sum(contiguous.values()) / k) > 1.3


def test_split_by_executor_honours_token_counts_in_row_order() -> None:
    ids = torch.tensor([[0, 1], [0, 2], [1, 0], [2, 3]])
    plan = LayerPlan({0: [("b", 2), ("c", 0)], 2: [("b", 0)]}, frozenset())
    parts = split_by_executor(ids, plan, "a")
    assert parts["b"].tolist() == [[0, -1], [0, 2], [-1, -1], [2, -1]]
    assert parts["c"].tolist() == [[-1, -1], [-1, -1], [-1, 0], [-1, -1]]
    assert parts["a"].tolist() == [[-1, 1], [-1, -1], [1, -1], [-1, 3]]


def test_split_by_executor_keeps_skipped_slots_and_unplanned_experts_here() -> None:
    ids = torch.tensor([[0, -1], [3, 1], [-1, -1], [1, 0]])
    plan = LayerPlan({0: [("b", 0)], 1: [("c", 1)]}, frozenset())  # expert 1: one token to c, the rest here
    parts = split_by_executor(ids, plan, "a")
    assert parts["b"].tolist() == [[0, -1], [-1, -1], [-1, -1], [-1, 0]]
    assert parts["c"].tolist() == [[-1, -1], [-1, 1], [-1, -1], [-1, -1]]
    assert parts["a"].tolist() == [[-1, -1], [3, -1], [-1, -1], [1, -1]]
    assert split_by_executor(torch.full((3, 2), -1), plan, "a") == {}


def test_lower_bound_is_the_slower_of_reading_and_computing() -> None:
    assert lower_bound_s(400, 100.0, 1.0) == 4.0
    assert lower_bound_s(0, 100.0, 5.0) == 5.0
    assert lower_bound_s(400, 0.0, 0.5) == 0.5  # unlimited disk: compute bound


def test_a_decode_token_runs_its_experts_on_the_idle_agents_that_hold_them() -> None:
    """One agent has the new token; the others have none but hold its experts (their reports
    come from IdleHoldings): the experts run there, and the prefetch plan reads nothing."""
    from scheduler.runner import IdleHoldings

    E = 4
    active = LayerReport(NODES[0], (1, 0, 1, 0), frozenset(), frozenset(), predicted=(0, 1, 0, 1),
                         resident_total=2, next_resident=frozenset())
    idle = IdleHoldings(E, {NODES[1]: frozenset({ExpertId(0, 2), ExpertId(1, 1)}),
                            NODES[2]: frozenset({ExpertId(0, 0), ExpertId(1, 3)})})
    reports = [active, *idle.at(0, predicted=True)]
    assert executors(schedule_layer(0, reports, profiles(3), COST)) == {0: {NODES[2]}, 2: {NODES[1]}}
    assert Policy().prefetches(1, reports, profiles(3), COST, E) == {}
    alone = Policy().prefetches(1, [active], profiles(3), COST, E)  # without them: read on the active agent
    assert alone == {NODES[0]: (1, 3)}


def test_direct_routes_name_the_experts_one_agent_holds_and_the_guessed_plan_leaves_there() -> None:
    # Layer 1 predicted: every agent's tokens use experts 0-2; none use expert 3.
    def reports(held: list[set[int]]) -> list[LayerReport]:
        return [LayerReport(n, (4, 4, 4, 4), frozenset(), frozenset(), predicted=(8, 8, 8, 0),
                            next_resident=frozenset(h)) for n, h in zip(NODES, held)]

    rs = reports([{0, 3}, {1}, {1}])  # 0 and 3: one holder; 1: two holders; 2: nobody
    pre = {NODES[2]: (2,)}  # the prefetch plan reads expert 2 on n2
    direct = Policy().direct_routes(1, rs, profiles(3), COST, 4, pre)
    assert direct == {0: NODES[0], 2: NODES[2]}  # 1 is split between its holders; 3 has no tokens
    assert Policy().direct_routes(1, rs, profiles(3), COST, 4, {}) == {0: NODES[0]}  # 2 not being read
    for off in ({"no_prefetch": True}, {"no_token_scheduling": True}):
        assert Policy.from_flags("sirius", **off).direct_routes(1, rs, profiles(3), COST, 4, pre) == {}
    assert Policy().direct_routes(1, rs[:1], profiles(1), COST, 4, {}) == {}  # one agent: nothing to send
    # The scheduler's step makes both from one guessed plan.
    ahead = Policy().prefetches(1, rs, profiles(3), COST, 4)
    assert Policy().lookahead(1, rs, profiles(3), COST, 4) == (ahead, Policy().direct_routes(1, rs, profiles(3), COST, 4, ahead))


def test_the_plan_keeps_direct_routes_and_schedules_the_other_experts_around_them() -> None:
    # Expert 0 was sent to n1 by a direct route, though only n0 holds it now (the guess was
    # stale): the plan keeps it on n1, and that work steers expert 1 (held by n1 and n2) to n2.
    reports = [report(NODES[0], [50, 40, 0], resident={0}), report(NODES[1], [50, 0, 0], resident={1}),
               report(NODES[2], [0, 0, 60], resident={1, 2})]
    assert executors(schedule_layer(0, reports, profiles(3), COST)) == {0: {NODES[0]}, 1: {NODES[1]}, 2: {NODES[2]}}
    fixed = schedule_layer(0, reports, profiles(3), COST, fixed={0: NODES[1]})
    assert executors(fixed) == {0: {NODES[1]}, 1: {NODES[2]}, 2: {NODES[2]}}
    assert fixed.shares[(NODES[0], 0)] == fixed.shares[(NODES[1], 0)] == ((NODES[1], 0),)


def test_auto_splits_a_short_prompt_s_unheld_expert_over_the_idle_disks() -> None:
    """One unheld expert, one token on each agent: read whole, one disk works while three idle;
    split, each agent reads a quarter. Every owner's pairs then go to the split (no shares)."""
    reports = [report(n, [1] + [0] * 15) for n in NODES]
    plan = schedule_layer(0, reports, profiles(4), COST, split="auto")
    assert plan.splits == {0: tuple(NODES)} and plan.shares == {}
    assert plan.executors(0) == set(NODES)
    whole = schedule_layer(0, reports, profiles(4), COST, split="never")
    assert whole.splits == {} and len(executors(whole)[0]) == 1


def test_auto_splits_two_agents_reads_when_two_others_idle() -> None:
    """Two unheld experts on four agents: whole, two disks read one each while two idle. Neither
    split alone shortens the layer (the other read still ends it), but both do."""
    reports = [report(n, [1, 1] + [0] * 14) for n in NODES]
    plan = schedule_layer(0, reports, profiles(4), COST, split="auto")
    assert set(plan.splits) == {0, 1} and plan.shares == {}


def test_auto_runs_a_cold_layer_s_many_experts_whole() -> None:
    """As many unheld experts as agents or more: whole reads already keep every disk busy, and a
    split would only add link traffic. `always` splits them all all the same."""
    reports = [report(n, [32] * 16) for n in NODES]
    assert schedule_layer(0, reports, profiles(4), COST, split="auto").splits == {}
    always = schedule_layer(0, reports, profiles(4), COST, split="always")
    assert set(always.splits) == set(range(16)) and always.shares == {}


def test_a_held_expert_is_never_split() -> None:
    """A holder runs it (its owners start their own tokens before the plan comes); only experts
    no agent holds may run in slices."""
    reports = [report(NODES[0], [4, 1] + [0] * 14), *(report(n, [1, 0] + [0] * 14, resident={0}) for n in NODES[1:])]
    plan = schedule_layer(0, reports, profiles(4), COST, split="always")
    assert set(plan.splits) == {1} and 0 not in plan.splits


def test_auto_splits_nothing_whose_read_costs_nothing_and_compute_little() -> None:
    """A page-cached store (no disk rate): one token's expert takes 0.2 ms to compute, below a
    split's own cost."""
    reports = [report(n, [1] + [0] * 15) for n in NODES]
    assert schedule_layer(0, reports, profiles(4, disk=0), COST, split="auto").splits == {}


def test_the_prefetch_guess_is_made_whole() -> None:
    """The next layer's prefetch reads whole experts, so its guess does not split: a predicted
    expert is then held (loading) and its layer's plan runs it whole."""
    guessed = [LayerReport(n, (1,) * 16, frozenset(), frozenset(), predicted=(1,) + (0,) * 15) for n in NODES]
    prefetch = Policy(split="always").prefetches(1, guessed, profiles(4), COST, 16)
    assert sum(len(v) for v in prefetch.values()) == 1  # expert 0, whole on one agent
