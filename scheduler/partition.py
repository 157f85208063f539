"""Which agent owns which new tokens of a step (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from scheduler.types import NodeId, StepPlan, StepShard


def contiguous_prefill(token_ids: Sequence[int], nodes: Sequence[NodeId]) -> StepPlan:
    """Split the prompt into len(nodes) contiguous runs, sizes differing by at most one.

    An agent gets no shard when there are fewer tokens than agents.
    """
    if not nodes:
        raise ValueError("a prefill needs at least one agent")
    n, k = len(token_ids), len(nodes)
    shards, start = [], 0
    for i, node in enumerate(nodes):
        size = n // k + (1 if i < n % k else 0)
        if size:
            shards.append(StepShard(node, tuple(token_ids[start : start + size]), tuple(range(start, start + size))))
        start += size
    return StepPlan(step=0, shards=tuple(shards), cached={node: 0 for node in nodes})


def after_step(plan: StepPlan) -> dict[NodeId, int]:
    """KV entries each agent holds once the step is done."""
    cached = dict(plan.cached)
    for shard in plan.shards:
        cached[shard.node] = cached.get(shard.node, 0) + len(shard.token_ids)
    return cached


def zigzag_prefill(token_ids: Sequence[int], nodes: Sequence[NodeId]) -> StepPlan:
    """Interleaved split: 2N near-equal chunks, agent i takes chunks i and 2N-1-i, so every agent
    holds one early and one late chunk and does the same causal-attention work (a contiguous
    split leaves the last agent N times the first one's)."""
    if not nodes:
        raise ValueError("a prefill needs at least one agent")
    n, k = len(token_ids), len(nodes)
    edges = [n * i // (2 * k) for i in range(2 * k + 1)]
    shards = []
    for i, node in enumerate(nodes):
        positions = [*range(edges[i], edges[i + 1]), *range(edges[2 * k - 1 - i], edges[2 * k - i])]
        if positions:
            shards.append(StepShard(node, tuple(token_ids[p] for p in positions), tuple(positions)))
    return StepPlan(step=0, shards=tuple(shards), cached={node: 0 for node in nodes})


def causal_work(plan: StepPlan) -> dict[NodeId, int]:
    """Query-key pairs each agent's attention covers in a prefill (its causal work)."""
    return {s.node: sum(p + 1 for p in s.positions) for s in plan.shards}


def chunk_step(plan: StepPlan, start: int, step: int, cached: Mapping[NodeId, int]) -> StepPlan:
    """A partition of a prompt chunk (positions counted from 0 within the chunk) as step `step` of
    the request: positions moved to start at `start`, with the K/V each agent holds from the
    earlier chunks (every member of the request keeps its place, with or without new tokens)."""
    shards = tuple(StepShard(s.node, s.token_ids, tuple(p + start for p in s.positions)) for s in plan.shards)
    return StepPlan(step=step, shards=shards, cached={**{n: 0 for n in plan.cached}, **cached})
