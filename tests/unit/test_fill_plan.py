"""plan_fill: which agent reads which expert that no agent holds (pure)."""

from __future__ import annotations

from protos.ids import ExpertId
from scheduler.fill import AgentHoldings, plan_fill, plan_swaps
from scheduler.policy import Policy
from scheduler.types import NodeId

MB = 1_000_000
EXPERTS = [ExpertId(layer, e) for layer in range(2) for e in range(4)]


def agent(name: str, held: set[tuple[int, int]], free: int | None, disk: float = 10 * MB) -> AgentHoldings:
    return AgentHoldings(NodeId(name), frozenset(ExpertId(*h) for h in held), free, disk)


def test_only_experts_no_agent_holds_are_read_once_within_free_room() -> None:
    a = agent("a", {(0, 0), (0, 1)}, free=1)
    b = agent("b", {(0, 1), (1, 0)}, free=2)
    plan = plan_fill([a, b], EXPERTS, MB)
    planned = [e for es in plan.values() for e in es]
    assert len(planned) == len(set(planned)) == 3  # three free slots for five missing experts
    assert not set(planned) & (a.held | b.held)
    assert len(plan[NodeId("a")]) <= 1 and len(plan[NodeId("b")]) <= 2
    assert set(planned) == {ExpertId(0, 2), ExpertId(0, 3), ExpertId(1, 1)}  # taken in the order given
    assert all(list(es) == sorted(es) for es in plan.values())


def test_the_faster_disk_reads_more_and_a_layer_spreads() -> None:
    fast, slow = agent("fast", set(), None, disk=30 * MB), agent("slow", set(), None, disk=10 * MB)
    plan = plan_fill([fast, slow], EXPERTS, MB)
    assert sorted(plan[NodeId("fast")] + plan[NodeId("slow")]) == EXPERTS  # unlimited memory: all of them
    assert len(plan[NodeId("fast")]) == 6 and len(plan[NodeId("slow")]) == 2  # both done in about 0.2 s
    even = plan_fill([agent("a", set(), None), agent("b", set(), None)], EXPERTS, MB)
    for experts in even.values():  # equal disks: each takes half of every layer
        assert [sum(e.layer == layer for e in experts) for layer in range(2)] == [2, 2]


def test_a_full_agent_gets_nothing_and_owners_are_respected() -> None:
    assert plan_fill([agent("a", set(), 0)], EXPERTS, MB) == {}
    owners = {NodeId("a"): {0, 1}, NodeId("b"): {2, 3}}
    plan = plan_fill([agent("a", set(), None), agent("b", {(0, 2)}, None)], EXPERTS, MB,
                     owner=lambda e: next(n for n, idx in owners.items() if e.index in idx))
    for node, experts in plan.items():
        assert {e.index for e in experts} <= owners[node]
    assert sum(len(es) for es in plan.values()) == len(EXPERTS) - 1


def test_policies_choose_whether_and_where_to_fill() -> None:
    agents = [agent("a", set(), 8), agent("b", set(), 8)]
    assert Policy.from_flags("naive").fills(agents, EXPERTS, MB, 4) == {}
    assert Policy.from_flags("sirius", no_fill=True).fills(agents, EXPERTS, MB, 4) == {}
    ep = Policy.from_flags("expert-parallel").fills(agents, EXPERTS, MB, 4)
    assert {e.index for e in ep[NodeId("a")]} == {0, 1} and {e.index for e in ep[NodeId("b")]} == {2, 3}
    assert Policy.from_flags("sirius", no_fill=True).label == "sirius --no-fill"


def test_a_pool_that_holds_every_expert_once_reads_the_missing_in_place_of_second_copies() -> None:
    # Full agents; (0,0) and (0,1) on both, so (1,2) and (1,3) are on neither.
    a = agent("a", {(0, 0), (0, 1), (0, 2), (0, 3)}, free=0)
    b = agent("b", {(0, 0), (0, 1), (1, 0), (1, 1)}, free=0)
    assert plan_fill([a, b], EXPERTS, MB) == {}
    swaps = plan_swaps([a, b], EXPERTS, {})
    held = {n.node: set(n.held) for n in (a, b)}
    for node, (loads, gone) in swaps.items():
        assert len(loads) == len(gone) and not set(gone) & set(loads)
        held[node] = held[node] - set(gone) | set(loads)
    assert held[NodeId("a")] | held[NodeId("b")] == set(EXPERTS)  # every expert on some agent, once
    assert sum(map(len, held.values())) == len(EXPERTS)
    assert [len(loads) for loads, _ in swaps.values()] == [1, 1]  # spread: each agent reads one
    # An expert already being filled is not read again; a placed copy is never given up.
    filled = {NodeId("a"): [ExpertId(1, 2)]}
    assert plan_swaps([a, b], EXPERTS, filled) == {NodeId("b"): ((ExpertId(1, 3),), (ExpertId(0, 1),))}
    kept = AgentHoldings(NodeId("a"), a.held, 0, a.disk_bytes_per_s, placed=frozenset({ExpertId(0, 0), ExpertId(0, 1)}))
    only_b = plan_swaps([kept, b], EXPERTS, {})
    assert set(only_b) == {NodeId("b")} and len(only_b[NodeId("b")][0]) == 2  # b gives up both copies
    assert Policy.from_flags("naive").swaps([a, b], EXPERTS, {}) == {}
    assert Policy.from_flags("expert-parallel").swaps([a, b], EXPERTS, {}) == {}
    assert Policy.from_flags("sirius").swaps([a, b], EXPERTS, {}) == swaps
