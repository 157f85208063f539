"""Typed messages of the scheduler, and how they flow.

    server  --GenerationRequest-->  Engine --> Batcher (batching.py: waiting, then running)
    prefill step (RequestRunner):   StepPlan (policy.partition, chunk_step) -> BeginStep on agents
                  per MoE layer:    LayerReport per agent -> RoutingPlan (policy.route: token
                                    scheduling under the cost model) + prefetch hints -> Forward
                  end of prefill:   logits -> sample (sampling.py) -> TokenEvent; choose_home -> AdoptKV
    decode step:                    DecodeStep per home (a DecodeSpan per request: its last token, or
                                    a chunk of a prompt its home prefills) -> logits per request ->
                                    sample -> TokenEvent

Pure decisions (partition, token scheduling, prefetch, home, routing table, sampling) take these
types and return
these types; the gRPC client that carries them out lives in `client.py`. The ones that cross the
wire (`LayerReport`, `RoutingPlan`, and the counters of `AgentSnapshot`) are defined once in
protos/messages.py, which the agents read too, and re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Shared with the agents (protos/ids.py, protos/messages.py); re-exported for the scheduler's users.
from protos.ids import ExpertId as ExpertId
from protos.ids import NodeId as NodeId
from protos.ids import RequestId as RequestId
from protos.messages import CacheCounters
from protos.messages import DecodeSpan as DecodeSpan
from protos.messages import LayerReport as LayerReport
from protos.messages import RoutingPlan as RoutingPlan
from protos.messages import Share as Share


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
class AgentSnapshot(CacheCounters):
    """What the scheduler last heard from one agent: its counters (CacheCounters' fields, given
    by keyword) and holdings; feeds /metrics and /health."""

    name: NodeId
    address: str
    up: bool
    held: frozenset[int] = frozenset()  # experts resident or being read, as layer * num_experts + index


@dataclass(frozen=True)
class EngineSnapshot:
    running: int  # requests being computed now
    waiting: int  # requests queued
    agents: tuple[AgentSnapshot, ...] = field(default_factory=tuple)


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
