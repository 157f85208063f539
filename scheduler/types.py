"""Typed messages of the scheduler, and how they flow.

    server  --GenerationRequest-->  Engine (queue)  --> RequestRunner
    RequestRunner, once per step:   StepPlan (policy.partition) -> BeginStep on agents
                  per MoE layer:    LayerReport per agent -> RoutingPlan (policy.route: token
                                    scheduling under the cost model) + prefetch hints -> Forward
                  end of step:      logits -> sample (sampling.py) -> TokenEvent to the server

Pure decisions (partition, token scheduling, prefetch, sampling) take these types and return
these types; the gRPC client that carries them out lives in `client.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The IDs are shared with the agents (protos/ids.py); re-exported here for the scheduler's users.
from protos.ids import ExpertId as ExpertId
from protos.ids import NodeId as NodeId
from protos.ids import RequestId as RequestId


@dataclass(frozen=True)
class NodeSpec:
    """An agent the scheduler should reach, as the inventory gives it."""

    name: NodeId
    address: str  # host:port of the agent's gRPC server
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Validated by the server before it gets here."""

    max_tokens: int  # new tokens at most (>= 1)
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    seed: int | None = None  # makes sampling reproducible
    stop_token_ids: frozenset[int] = frozenset()  # end-of-sequence ids; not emitted as text
    logprobs: bool = False  # report the chosen token's log-probability
    top_logprobs: int = 0  # and this many alternatives (0..20)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: RequestId
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, as the engine yields it to the server."""

    token_id: int
    logprob: float | None = None  # natural log; None unless asked for
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first
    is_stop: bool = False  # the token is an end-of-sequence id (finish_reason "stop")


@dataclass(frozen=True)
class AgentSnapshot:
    """What the scheduler last heard from one agent; feeds /metrics and /health."""

    name: NodeId
    address: str
    up: bool
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    bytes_read: int = 0  # bytes read from the expert store
    bytes_sent: int = 0  # tensor bytes sent over the link
    bytes_used: int = 0  # expert buffer bytes resident now
    capacity_bytes: int = 0  # expert buffer budget (0 = unlimited)
    attention_s: float = 0.0  # seconds spent in attention
    prefetches: int = 0  # experts read because a prefetch asked
    predicted_used: int = 0  # experts used that the previous layer's prediction named
    used: int = 0  # experts used in layers that had a prediction (recall = predicted_used / used)
    predicted_pairs_used: int = 0  # (token, slot) pairs of those layers whose expert the prediction named
    pairs_used: int = 0  # (token, slot) pairs in layers that had a prediction (pair recall = the ratio)
    compute_overrun_s: float = 0.0  # paced compute past its emulated speed (the host fell short)
    early_used: int = 0  # experts run on its own tokens before the plan came, confirmed by the plan
    early_dropped: int = 0  # such early runs the plan overruled
    fills: int = 0  # experts read into free memory because a fill asked
    fill_preemptions: int = 0  # fill reads stopped part-way for a demand or prefetch read
    direct_sent: int = 0  # experts whose tokens it sent to their executor by a direct route, before the plan
    decode_steps: int = 0  # decode steps it ran as a home agent
    decode_tokens: int = 0  # tokens decoded in them
    decode_round_trips: int = 0  # synchronous waits on peers within its decode steps (at most one per layer)
    decode_remote_experts: int = 0  # (layer, expert) runs of its decode steps sent to remote holders
    requests: int = 0  # requests it holds state for now (prefill K/V or a decode cache)
    held: frozenset[int] = frozenset()  # experts resident or being read, as layer * num_experts + index


@dataclass(frozen=True)
class EngineSnapshot:
    running: int  # requests being computed now
    waiting: int  # requests queued
    agents: tuple[AgentSnapshot, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class LayerReport:
    """One agent's answer after the router of a layer (from ForwardReply)."""

    node: NodeId
    counts: tuple[int, ...]  # tokens it owns routed to each expert; () for a dense-MLP layer
    resident: frozenset[int]  # expert indices of the layer resident in its buffer
    loading: frozenset[int]  # expert indices of the layer being read into its buffer
    attention_s: float = 0.0  # seconds it spent in the layer's attention
    predicted: tuple[int, ...] = ()  # next layer's predicted counts (empty unless asked)
    resident_total: int = 0  # experts of all layers in its buffer, resident or being read (slots taken)
    next_resident: frozenset[int] = frozenset()  # next layer's experts in its buffer
    next_loading: frozenset[int] = frozenset()  # next layer's experts being read


Share = tuple[NodeId, int]  # (executor, tokens): tokens 0 = all the owner's remaining pairs


@dataclass(frozen=True)
class RoutingPlan:
    """Who runs which expert for whose tokens, for one MoE layer of one step (scheduler-owned).

    An owner's (token, slot) pairs routed to an expert go to the shares' executors in row order;
    several shares split them. A pair absent from the plan runs on its owner.
    """

    layer: int
    shares: dict[tuple[NodeId, int], tuple[Share, ...]]  # (owner, expert index) -> shares

    @classmethod
    def whole(cls, layer: int, executor: dict[tuple[NodeId, int], NodeId]) -> RoutingPlan:
        """Each (owner, expert) entirely on one executor."""
        return cls(layer, {key: ((node, 0),) for key, node in executor.items()})

    def executors(self, expert: int) -> set[NodeId]:
        return {x for (_, e), shares in self.shares.items() if e == expert for x, _ in shares}


@dataclass(frozen=True)
class StepShard:
    """The new tokens one agent owns in a step."""

    node: NodeId
    token_ids: tuple[int, ...]
    positions: tuple[int, ...]  # absolute positions, same length as token_ids


@dataclass(frozen=True)
class StepPlan:
    """One step (prefill or one decoded token) of one request: who holds which new tokens."""

    step: int  # 0 = prefill
    shards: tuple[StepShard, ...]  # agents with new tokens
    cached: dict[NodeId, int]  # KV entries each agent holds from earlier steps
