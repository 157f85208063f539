"""Typed messages of the scheduler, and how they flow.

    server  --GenerationRequest-->  Engine --> Batcher (batching.py: waiting, then running)
    prefill step (RequestRunner):   StepPlan (policy.partition, chunk_step) -> BeginStep on agents
                  per MoE layer:    LayerReport per agent -> RoutingPlan (policy.route: token
                                    scheduling under the cost model) + prefetch hints -> Forward
                  end of prefill:   logits -> sample (protos/sampling.py) -> TokenEvent; choose_home ->
                                    AdoptKV (with the request's SamplingParams and generator)
    decode step:                    DecodeStep per home (a DecodeSpan per request: its last token,
                                    the token the home sampled in the step before, or a chunk of a
                                    prompt its home prefills) -> the home samples -> TokenEvent

Pure decisions (partition, token scheduling, prefetch, home, routing table, sampling) take these
types and return
these types; the gRPC client that carries them out lives in `client.py`. The ones that cross the
wire (`LayerReport`, `RoutingPlan`, and the counters of `AgentSnapshot`) are defined once in
protos/messages.py, which the agents read too, and re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# Shared with the agents (protos/ids.py, protos/messages.py); re-exported for the scheduler's users.
from protos.ids import ExpertId as ExpertId
from protos.ids import NodeId as NodeId
from protos.ids import RequestId as RequestId
from protos.messages import CacheCounters
from protos.messages import DecodeSpan as DecodeSpan
from protos.messages import LayerReport as LayerReport
from protos.messages import RoutingPlan as RoutingPlan
from protos.messages import SamplingParams as SamplingParams
from protos.messages import Share as Share
from protos.messages import TokenEvent as TokenEvent


@dataclass(frozen=True)
class NodeSpec:
    """An agent the scheduler should reach, as the inventory gives it."""

    name: NodeId
    address: str  # host:port of the agent's gRPC server
    labels: tuple[str, ...] = ()
    users: tuple[str, ...] = ()  # OpenAI `user` values whose requests decode on this agent (their home)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: RequestId
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    user: str | None = None  # the OpenAI `user` field: requests of one user share a home agent
    # Called once when the request leaves the queue and starts running (the server's queue-time
    # metric); None: nobody asks.
    on_admitted: Callable[[], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class AgentSnapshot(CacheCounters):
    """What the scheduler last heard from one agent: its counters (CacheCounters' fields, given
    by keyword) and holdings; feeds /metrics and /health."""

    name: NodeId
    address: str
    up: bool
    held: frozenset[int] = frozenset()  # experts resident or being read, as layer * num_experts + index
    loading: frozenset[int] = frozenset()  # of those, the ones still being read
    placed: frozenset[int] = frozenset()  # the placement it keeps (SetPlacement), the same way
    problem: str = ""  # why it is not up: unreachable (the transport's reason) or refused at join
    labels: tuple[str, ...] = ()  # the inventory's labels of the node (for people: status, /health)
    slices: frozenset[tuple[int, int, int]] = frozenset()  # slices resident on their own: (expert, part, of)
    expert_read_s: float = 0.0  # one expert's read on its disk, as measured, else as throttled (0: unknown)
    round_trip_s: float = 0.0  # a synchronous wait on its decode peers, as it last measured one


@dataclass(frozen=True)
class EngineSnapshot:
    running: int  # requests being computed now
    waiting: int  # requests queued
    agents: tuple[AgentSnapshot, ...] = field(default_factory=tuple)
    migrations: int = 0  # re-plans that moved experts
    migration_bytes: int = 0  # expert bytes the agents were asked to gain by them
    placement_cost: float | None = None  # C(P) of the placement in force at the last re-plan; None before one
    prefetch_experts: int = 0  # experts the pool-wide decode prefetch had agents read
    prefetch_hits: int = 0  # decode selections of an expert it read
    prefetch_misses: int = 0  # decode selections of one no agent held when it planned, nor read
    unheld_experts: int | None = None  # routed experts no agent up holds (resident or being read); None: no model yet


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
