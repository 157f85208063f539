"""The load balance of a step (scheduler/balance.py): which experts run whole and which split
across agents, from the timing model; held to the exact optimum on small instances."""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import combinations, permutations

import pytest

from protos.ids import ExpertId, NodeId, SliceId
from scheduler.balance import (WHOLE, Agent, Ends, Need, Run, Slice, SplitMode, Timeline, _slices, balance,
                               decode_runs, expert_kinds, finish_s)
from scheduler.cost_model import AgentProfile, AgentTime, CostModel

# The bench preset's expert (hidden 512, intermediate 768, float32): 4.7 MB, 2.4 MFLOP a token.
MODEL = CostModel(expert_bytes=4_718_592, token_bytes=2048, flops_per_token=2.0 * 3 * 512 * 768)
HOME = NodeId("a0")


def agents(n: int, disk: float = 50e6, latency_s: float = 0.001, flops: float = 10e9) -> list[Agent]:
    return [Agent(AgentProfile(NodeId(f"a{i}"), disk, 125e6, flops, None), latency_s) for i in range(n)]


def e(i: int) -> ExpertId:
    return ExpertId(1, i)


def test_a_resident_expert_is_not_split_for_one_token() -> None:
    four = agents(4)
    assert balance(four, HOME, MODEL, [Need(e(0), 1, {HOME: frozenset({WHOLE})})]) == [Run(e(0), (HOME,))]
    held_away = Need(e(1), 1, {NodeId("a2"): frozenset({WHOLE})})
    assert balance(four, HOME, MODEL, [held_away]) == [Run(e(1), (NodeId("a2"),))]  # a round trip, no read


def test_an_expert_nobody_holds_is_read_in_slices_over_every_disk() -> None:
    four = agents(4)
    [run] = balance(four, HOME, MODEL, [Need(e(0), 1)])
    assert sorted(run.nodes) == [a.node for a in four]
    whole = finish_s(four, HOME, MODEL, [Need(e(0), 1)], [Run(e(0), (HOME,))])
    assert finish_s(four, HOME, MODEL, [Need(e(0), 1)], [run]) < whole / 3  # 94 ms read whole, a quarter split


def test_without_a_disk_to_wait_for_one_token_stays_whole_on_the_home() -> None:
    fast = agents(2, disk=0.0)
    assert balance(fast, HOME, MODEL, [Need(e(0), 1)]) == [Run(e(0), (HOME,))]


def test_a_prefill_chunk_splits_a_compute_heavy_expert() -> None:
    """512 tokens on one agent: 120 ms of compute on the home; split four ways, a quarter each
    beside the slices' reads and the hidden states over the link."""
    four = agents(4)
    need = Need(e(0), 512, {HOME: frozenset({WHOLE})})
    [run] = balance(four, HOME, MODEL, [need])
    assert run.split
    assert finish_s(four, HOME, MODEL, [need], [run]) < finish_s(four, HOME, MODEL, [need], [Run(e(0), (HOME,))])


def test_a_held_slice_is_used_where_it_is() -> None:
    two = agents(2)
    need = Need(e(0), 1, {HOME: frozenset({Slice(0, 2)}), NodeId("a1"): frozenset({Slice(1, 2)})})
    assert balance(two, HOME, MODEL, [need]) == [Run(e(0), (HOME, NodeId("a1")))]


@pytest.mark.parametrize("mode", ["never", "always"])
def test_the_modes_force_whole_or_split(mode: SplitMode) -> None:
    four = agents(4)
    needs = [Need(e(i), 1, {NodeId(f"a{i}"): frozenset({WHOLE})}) for i in range(3)] + [Need(e(3), 1)]
    runs = balance(four, HOME, MODEL, needs, mode)
    assert [r.expert for r in runs] == [n.expert for n in needs]
    assert all(r.split for r in runs) if mode == "always" else not any(r.split for r in runs)
    assert not balance(agents(1), HOME, MODEL, needs, "always")[0].split  # one agent: nothing to split over


def test_skewed_reads_spread_over_the_agents() -> None:
    """Six experts nobody holds: whole, each on the home, the step waits for six reads one after
    another; the balance ends it in little more than the pooled disks' time."""
    four = agents(4)
    needs = [Need(e(i), 1) for i in range(6)]
    runs = balance(four, HOME, MODEL, needs)
    pooled = 6 * MODEL.expert_bytes / (4 * 50e6)
    assert finish_s(four, HOME, MODEL, needs, runs) < 1.15 * pooled + 0.003
    assert finish_s(four, HOME, MODEL, needs, balance(four, HOME, MODEL, needs, "never")) > 1.3 * pooled


def brute_force(ags: Sequence[Agent], needs: Sequence[Need], mode: SplitMode) -> float:
    """The best finish over every assignment: each need whole on any agent, or split over any
    two or more in any slice order, where the mode allows."""
    nodes = [a.node for a in ags]
    options = []
    for need in needs:
        opts = [] if mode == "always" and len(nodes) > 1 else [Run(need.expert, (n,)) for n in nodes]
        if mode != "never":
            opts += [Run(need.expert, order) for m in range(2, len(nodes) + 1)
                     for group in combinations(nodes, m) for order in permutations(group)]  # fmt: skip
        options.append(opts)
    best = float("inf")

    def walk(i: int, picked: list[Run]) -> None:
        nonlocal best
        if i == len(needs):
            best = min(best, finish_s(ags, HOME, MODEL, needs, picked))
            return
        for run in options[i]:
            walk(i + 1, [*picked, run])

    walk(0, [])
    return best


def random_instance(rng: random.Random) -> tuple[list[Agent], list[Need]]:
    n = rng.choice([2, 3])
    ags = [Agent(AgentProfile(NodeId(f"a{i}"), rng.choice([0.0, 25e6, 50e6, 200e6]), rng.choice([12.5e6, 125e6]),
                              rng.choice([2e9, 10e9]), None), rng.choice([0.0005, 0.001, 0.005]),
                 AgentTime(disk_s=rng.choice([0.0, 0.0, 0.02]))) for i in range(n)]  # fmt: skip
    needs = []
    for i in range(rng.choice([1, 2, 3])):
        held = {a.node: frozenset({rng.choice([WHOLE, Slice(0, 2), Slice(1, 2)])}) for a in ags if rng.random() < 0.4}
        needs.append(Need(e(i), rng.choice([1, 1, 4, 128, 512]), held))
    return ags, needs


@pytest.mark.parametrize("mode", ["auto", "never", "always"])
def test_balance_is_near_the_exact_optimum_on_small_instances(mode: SplitMode) -> None:
    """Greedy against every assignment of 2-3 agents and 1-3 experts (unlike disks, links,
    compute, latencies and backlogs; held wholes and halves; 1 to 512 tokens). Measured: 141
    (auto), 149 (never) and 142 (always) of the 150 at the optimum, the worst 1.33x it (a
    greedy step that reads a whole expert where splitting two would have shared the reads)."""
    rng, ratios = random.Random(7), []
    for _ in range(150):
        ags, needs = random_instance(rng)
        got = finish_s(ags, HOME, MODEL, needs, balance(ags, HOME, MODEL, needs, mode))
        ratios.append(got / brute_force(ags, needs, mode))
    assert sum(r < 1 + 1e-9 for r in ratios) >= 0.9 * len(ratios) and max(ratios) <= 1.35, sorted(ratios)[-5:]


def test_slices_go_where_the_last_one_ends_soonest() -> None:
    """Slice i of m on nodes[i]: the latest-ending slice ends as soon as in any assignment of the
    m slices to m distinct agents (every one tried), with no slice held (each agent ends any
    slice alike) and with slices held here and there (an agent ends its own slice sooner)."""
    rng = random.Random(11)
    for _ in range(300):
        n = rng.randint(2, 5)
        ags = [Agent(AgentProfile(NodeId(f"a{i}"), rng.choice([0.0, 25e6, 200e6]), rng.choice([12.5e6, 125e6]), 10e9,
                                  None), rng.choice([0.0, 0.001]), AgentTime(disk_s=rng.random() * 0.05))
               for i in range(n)]  # fmt: skip
        line, nodes = Timeline(ags, HOME, MODEL), sorted(a.node for a in ags)
        m = rng.randint(2, n)
        held = {} if rng.random() < 0.5 else {
            a.node: frozenset({Slice(rng.randrange(m), m)}) for a in ags if rng.random() < 0.5}  # fmt: skip
        need = Need(e(0), rng.choice([1, 64]), held)

        def last_end(order: Sequence[NodeId]) -> float:
            return max(line.finish_s(nd, line.added(nd, need, Slice(i, m))) for i, nd in enumerate(order))

        got = _slices(line, need, nodes, m)
        assert len(set(got)) == m
        assert last_end(got) == min(last_end(order) for order in permutations(nodes, m))


# Decode: the runs the scheduler publishes for each home (balance.decode_runs) ---------------


def test_decode_runs_an_unheld_expert_over_every_disk_and_leaves_held_ones_whole() -> None:
    four, a2 = agents(4), NodeId("a2")
    experts = [e(0), e(1), e(2)]
    held = {a2: frozenset({e(1)}), HOME: frozenset({e(2)})}
    splits = decode_runs(four, HOME, MODEL, expert_kinds(experts, held, {}))
    assert splits == {e(0): tuple(a.node for a in four)}  # slice i on the i-th; e(1) to a2, e(2) at home
    assert decode_runs(four, HOME, MODEL, expert_kinds(experts, held, {}), mode="never") == {}
    always = decode_runs(four, HOME, MODEL, expert_kinds(experts, held, {}), mode="always")
    assert set(always) == {e(0), e(1)}  # never what the home holds itself


def test_decode_runs_nothing_where_reads_are_free_or_cost_less_than_the_split() -> None:
    experts = [e(0), e(1)]
    assert decode_runs(agents(4, disk=0.0), HOME, MODEL, expert_kinds(experts, {}, {})) == {}  # unlimited disks
    fast = agents(4, disk=5e9)  # a page-cached read: about 1 ms, near a round trip
    assert decode_runs(fast, HOME, MODEL, expert_kinds(experts, {}, {})) == {}
    assert set(decode_runs(agents(4), HOME, MODEL, expert_kinds(experts, {}, {}))) == set(experts)  # 94 ms reads: split
    # What the model leaves out of a split, priced: the split must save more than that. The
    # step's second unheld expert then goes whole to another disk than the home's.
    read_s = MODEL.expert_bytes / 50e6
    runs = decode_runs(agents(4), HOME, MODEL, expert_kinds(experts, {}, {}), split_overhead_s=read_s)
    assert runs == {e(1): (NodeId("a1"),)}


def test_decode_runs_leave_out_a_slow_disk_and_give_a_held_slice_to_its_holder() -> None:
    three = agents(3)
    slow = Agent(AgentProfile(NodeId("a3"), 5e6, 125e6, 10e9, None), 0.001)  # a tenth of the others' rate
    [(_, nodes)] = decode_runs([*three, slow], HOME, MODEL, expert_kinds([e(0)], {}, {})).items()
    assert sorted(nodes) == [a.node for a in three]
    # a1 holds slice 2 of 3 (and a2 slice 0): each is seated where it is held.
    held_slices = {NodeId("a1"): frozenset({SliceId(e(4), 2, 3)}), NodeId("a2"): frozenset({SliceId(e(4), 0, 3)})}
    runs = decode_runs(three, HOME, MODEL, expert_kinds([e(4), e(5)], {}, held_slices))
    assert runs[e(4)] == (NodeId("a2"), HOME, NodeId("a1")) and runs[e(5)] == (HOME, NodeId("a1"), NodeId("a2"))


def test_decode_runs_send_a_slow_homes_reads_to_faster_disks_two_ways() -> None:
    """A home on a disk 8x slower than the fastest: the two unheld experts of a step go whole to
    the fastest disk and split over the three faster ones, in turn by index, not both to one disk."""
    rates = {"a0": 25e6, "a1": 200e6, "a2": 100e6, "a3": 50e6}
    mixed = [Agent(AgentProfile(NodeId(n), r, 125e6, 10e9, None), 0.001) for n, r in rates.items()]
    runs = decode_runs(mixed, HOME, MODEL, expert_kinds([e(0), e(1), e(2)], {}, {}), split_overhead_s=0.002)
    assert runs[e(0)] == runs[e(2)] == (NodeId("a1"),) and sorted(runs[e(1)]) == [NodeId(n) for n in ("a1", "a2", "a3")]


def test_the_timelines_kept_ends_are_the_ones_it_would_work_out() -> None:
    """`Timeline.end_s` keeps answers by (agent, cut, held, tokens) until work is added, and
    timelines from one start share them: each equals the finish worked out from nothing, before
    and after work is added to either timeline."""
    rnd = random.Random(5)
    group = [Agent(a.profile, a.latency_s, AgentTime(rnd.uniform(0, 0.02), rnd.uniform(0, 0.02), 0.0))
             for a in agents(4)]
    nodes = [a.node for a in group]
    needs = [Need(e(j), rnd.randint(1, 40), {n: frozenset({Slice(rnd.randrange(of), of)}) if rnd.random() < 0.5
                                             else frozenset({WHOLE}) for n in rnd.sample(nodes, 2)})
             for j, of in enumerate((2, 3, 4, 2, 3))]
    start: Ends = {}
    lines = [Timeline(group, HOME, MODEL, start), Timeline(group, HOME, MODEL, start)]
    for need in needs:
        for line in lines:
            for node in nodes:
                for of in (1, 2, 3, 4):
                    for index in range(of):
                        part = Slice(index, of)
                        assert need.holds(node, index, of) == need.has(node, part)
                        assert line.end_s(node, need, index, of) == line.finish_s(node, line.added(node, need, part))
        lines[0].place(Run(need.expert, tuple(nodes[:2])), need)  # only the first timeline moves on
