"""The migration rule and the problem the live cluster gives the policies."""

from __future__ import annotations

import dataclasses

from protos.ids import ExpertId, NodeId
from protos.messages import AgentInfo
from scheduler.placement.problem import Activations
from scheduler.placement.replan import CACHE_SLOTS, decide, problem_for, sources
from tests.unit.placement_support import EXPERT_BYTES, device, problem

A, B = NodeId("a"), NodeId("b")


def info(name: str, memory_experts: int) -> AgentInfo:
    return AgentInfo(name=NodeId(name), model_type="qwen3_moe", num_layers=2, num_experts=4, vocab_size=100,
                     fingerprint="f", expert_bytes=EXPERT_BYTES, memory_bytes=memory_experts * EXPERT_BYTES,
                     disk_bytes_per_s=50e6, link_bytes_per_s=62.5e6, max_positions=512, dense_layers=frozenset(),
                     flops_per_s=20e9, hidden_size=512, dtype_bytes=4, link_latency_s=0.001)


def test_the_live_problem_keeps_a_cache_slot_and_drops_strangers_statistics() -> None:
    counts = {A: {ExpertId(0, 1): 5.0}, NodeId("gone"): {ExpertId(0, 2): 9.0}}
    held = {B: frozenset({ExpertId(0, 0), ExpertId(1, 3), ExpertId(1, 2)})}
    p = problem_for([info("a", 3), info("b", 0)], Activations(counts), [0, 1], top_k=2, holdings=held)
    assert p.slots(A) == 3 - CACHE_SLOTS
    assert p.slots(B) == 3  # no budget: as many as it holds now, not all 8
    assert set(p.activations.counts) == {A} and p.top_k == 2 and p.token_bytes == 512 * 4


def test_migrate_only_when_the_saving_outweighs_the_move() -> None:
    C = NodeId("c")
    p = problem([device("a", 2), device("b", 2), device("c", 4)], layers=(0,), num_experts=4, tokens=50, seed=1)
    hot = {h: max(c, key=c.__getitem__) for h, c in p.activations.counts.items()}
    everything = frozenset(ExpertId(0, e) for e in range(4))
    current = {A: frozenset(), B: frozenset(), C: everything}  # every access of a and b is a call to c
    better = {A: frozenset({hot[A]}), B: frozenset({hot[B]}), C: everything}
    go = decide(p, current, better)
    assert go.migrate and go.cost_new_s + go.migration_s < go.cost_now_s and go.remote_new < go.remote_now
    assert go.moves == {A: (frozenset({hot[A]}), frozenset()), B: (frozenset({hot[B]}), frozenset())}
    assert go.migration_bytes == 2 * EXPERT_BYTES
    # The same gain, but the experts come over a 1 MB/s disk or a 10 MB/s link: moving costs more.
    slow = dataclasses.replace(p, devices=tuple(dataclasses.replace(d, disk_bytes_per_s=1e6, link_bytes_per_s=1e7)
                                                for d in p.devices))
    stay = decide(slow, current, better)
    assert not stay.migrate and stay.cost_new_s < stay.cost_now_s
    assert decide(slow, current, better, force=True).migrate
    assert decide(p, better, better).moves == {}


def test_an_expert_comes_from_a_holder_only_where_that_beats_the_disk() -> None:
    C = NodeId("c")
    fast_disk = problem([device("a", 2, disk=1e9), device("b", 2), device("c", 2)], num_experts=4)
    slow_disk = problem([device("a", 2, disk=1e6), device("b", 2), device("c", 2, link=1e6)], num_experts=4)
    e, f = ExpertId(0, 1), ExpertId(0, 2)
    holdings = {B: frozenset({e}), C: frozenset({e, f}), A: frozenset()}
    assert sources(fast_disk, holdings, A, frozenset({e, f})) == {}  # 1 ms from disk beats 16 ms over the link
    assert sources(slow_disk, holdings, A, frozenset({e, f, ExpertId(0, 3)})) == {e: B}  # c's link is slow too
    unlimited = problem([device("a", 2, disk=0.0), device("b", 2)], num_experts=4)
    assert sources(unlimited, {B: frozenset({e})}, A, frozenset({e})) == {}  # an unemulated disk: read it
