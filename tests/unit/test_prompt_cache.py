"""The pool-wide decode prefetch: which experts the agents' cache memory takes for the running
prompts (`decode_plan.prompt_cache`), how a home-prefilled prompt's selections are counted
(`batch_state.count_prompts`), and how decode selections are judged against the plans
(`PrefetchTally`)."""

from __future__ import annotations

import torch

from protos.ids import ExpertId, RequestId
from scheduler.batch_state import PrefetchTally, Seq, count_prompts
from scheduler.decode_plan import CacheRoom, prompt_cache
from scheduler.types import DecodeSpan, GenerationRequest, NodeId, SamplingParams

A, B = NodeId("a"), NodeId("b")
ROUTED = 32  # the model's routed experts: more than these pools hold


def e(layer: int, index: int) -> ExpertId:
    return ExpertId(layer, index)


def test_the_prompt_s_most_chosen_replace_the_least_chosen_spread_over_the_disks() -> None:
    counts = {e(0, 0): 5, e(0, 1): 3, e(0, 2): 1, e(1, 0): 4, e(1, 3): 2}
    rooms = {A: CacheRoom(frozenset({e(0, 5), e(1, 6)}), slots=3), B: CacheRoom(frozenset({e(0, 0), e(1, 7)}), slots=3)}
    plan = prompt_cache(counts, rooms, ROUTED)
    # Room for 2 a agent (one slot of 3 stays for demand reads): the target is round 0 of every
    # layer (0/0, 1/0), then round 1 (0/1, 1/3); 0/0 is held already, 0/2 does not fit.
    loads = [x for n in sorted(plan) for x in plan[n][0]]
    assert sorted(loads) == [e(0, 1), e(1, 0), e(1, 3)]
    assert {n: len(plan[n][0]) for n in plan} == {A: 2, B: 1}  # the fewest reads first: both disks
    gone = {x for n in plan for x in plan[n][1]}
    assert gone == {e(0, 5), e(1, 6), e(1, 7)} and e(0, 0) not in gone  # a target entry stays
    for n, (read, evict) in plan.items():  # each read has its room: free, or an entry given up
        assert len(evict) <= len(read) and set(evict) <= rooms[n].held


def test_reads_spread_over_the_disks_free_room_first_at_equal_reads() -> None:
    counts = {e(0, 0): 3, e(0, 1): 2, e(0, 8): 1}
    rooms = {A: CacheRoom(frozenset({e(0, 5)}), slots=4), B: CacheRoom(frozenset({e(0, 6), e(0, 7), e(0, 8)}), slots=4)}
    plan = prompt_cache(counts, rooms, ROUTED)
    # a has 2 free slots, b none: the first read goes to a; the second to b, the disk with fewer
    # reads, for the entry its prompt chose least (0/6 and 0/7 never; 0/8 is in the target).
    assert plan == {A: ([e(0, 0)], []), B: ([e(0, 1)], [e(0, 6)])}


def test_a_placed_expert_is_never_given_up_nor_counted_against_the_cache() -> None:
    counts = {e(0, 0): 9, e(0, 1): 8, e(0, 2): 7}
    placed = frozenset({e(0, 3)})
    rooms = {A: CacheRoom(frozenset({e(0, 3), e(0, 4)}), placed=placed, slots=3)}
    plan = prompt_cache(counts, rooms, ROUTED)
    assert plan == {A: ([e(0, 0)], [e(0, 4)])}  # room 3 - 1 - 1 placed = 1: the most chosen
    assert prompt_cache(counts, {A: CacheRoom(frozenset({e(0, 3)}), placed=placed, slots=2)}, ROUTED) == {}  # no room


def test_nothing_moves_when_the_pool_holds_the_target_or_memory_is_unlimited() -> None:
    counts = {e(0, 0): 2, e(1, 1): 1}
    assert prompt_cache(counts, {A: CacheRoom(frozenset({e(0, 0), e(1, 1), e(0, 9)}), slots=4)}, ROUTED) == {}
    assert prompt_cache(counts, {A: CacheRoom(frozenset({e(0, 9)})), B: CacheRoom(frozenset(), slots=2)}, ROUTED) == {}
    assert prompt_cache({}, {A: CacheRoom(frozenset({e(0, 9)}), slots=2)}, ROUTED) == {}
    # A pool whose memory holds every routed expert is the fills' to fill, layer by layer.
    assert prompt_cache(counts, {A: CacheRoom(frozenset({e(0, 9)}), slots=3)}, routed=3) == {}
    assert prompt_cache(counts, {A: CacheRoom(frozenset({e(0, 9)}), slots=3)}, routed=4) != {}


def test_an_expert_no_prompt_chose_is_never_read() -> None:
    counts = {e(0, 0): 1, e(0, 1): 0}
    plan = prompt_cache(counts, {A: CacheRoom(frozenset({e(0, 5), e(0, 6)}), slots=3)}, ROUTED)
    assert plan == {A: ([e(0, 0)], [e(0, 5)])}  # ties among the unchosen: the lowest (layer, index) first


def _seq(prompt: int, experts: int, layers: int) -> Seq:
    request = GenerationRequest(RequestId("r"), tuple(range(prompt)), SamplingParams(max_tokens=4))
    return Seq(request, counts=[0] * (layers * experts))


def test_a_home_step_s_prompt_rows_are_counted_and_its_decode_rows_judged() -> None:
    tally = PrefetchTally()
    first, second = _seq(3, experts=4, layers=2), _seq(2, experts=4, layers=2)
    second.counts = [0] * 8
    # One step: the last 2 prompt tokens of `first` (positions 1, 2), then `second`'s decode token.
    group = [(first, DecodeSpan("r", (7, 8), 1), 0), (second, DecodeSpan("r", (9,), 2), 0)]
    selections = torch.tensor([[[0, 1], [1, 2], [3, -1]],  # MoE layer 0, rows x k
                               [[2, 3], [2, 0], [1, 1]]])  # MoE layer 1
    tally.plan(4, read=frozenset({3, 5}), unheld=frozenset({1, 4}))
    count_prompts(group, selections, tally)
    assert first.counts == [1, 2, 1, 0, 1, 0, 2, 1]  # layer 0: 0,1,1,2; layer 1: 2,3,2,0
    assert second.counts == [0] * 8  # a decode token is not part of its prompt
    # second's row: layer 0 chose 3 (read: a hit), -1 (none); layer 1 chose 1 twice (flat 5: a hit)
    assert (tally.hits, tally.misses) == (3, 0)


def test_the_tally_keeps_every_plan_s_reads_and_drops_them_from_the_unheld() -> None:
    tally = PrefetchTally()
    assert not tally.planned
    tally.plan(4, read=frozenset({1}), unheld=frozenset({2, 3}))
    tally.plan(4, read=frozenset({2}), unheld=frozenset({5}))
    assert tally.read == {1, 2} and tally.unheld == {3, 5}
    tally.decoded(torch.tensor([[[1, 3]], [[1, -1]]]))  # flat 1 (hit), 3 (miss), 5 (miss)
    assert (tally.hits, tally.misses) == (1, 2)
