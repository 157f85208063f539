"""What any message can make an agent hold, bounded: checked before anything is allocated.

A request names its sizes (tokens of a step, positions, K/V rows); each is checked against the
model and these limits first, so a malformed or hostile message costs a refusal, not memory:
INVALID_ARGUMENT for a message that can never be served (too many tokens in one step), and
RESOURCE_EXHAUSTED for one that could be later (the agent holds too many requests, or too much
K/V waiting in its inbox). State no message has touched for `request_ttl_s` is dropped, so a
server that dies mid-request leaves nothing behind for long.

gRPC itself bounds every message (protos/limits.py: MAX_MESSAGE_BYTES, both directions) and the
decode data plane checks each frame's length before reading it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from node_agent.model.config import MoeConfig
from node_agent.state import RequestState, UnknownRequest


class Overloaded(RuntimeError):
    """A limit of the agent is reached for now (RESOURCE_EXHAUSTED): the caller may retry later."""


@dataclass(frozen=True)
class AgentLimits:
    max_step_tokens: int = 32768  # new tokens of one request in one prefill step (BeginStep)
    max_requests: int = 256  # requests with state here: prefill shards and decode caches
    max_inbox_bytes: int = 1 << 30  # K/V pushed by peers and not yet used, all requests together
    max_peers: int = 256  # agents one step may name
    request_ttl_s: float = 600.0  # a request no message touched for this long is released

    def __post_init__(self) -> None:
        for name in ("max_step_tokens", "max_requests", "max_inbox_bytes", "max_peers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.request_ttl_s <= 0:
            raise ValueError(f"request_ttl_s must be > 0, got {self.request_ttl_s}")


def control_message_bytes(limits: AgentLimits) -> int:
    """The largest control message (BeginStep, plans, routing tables) an agent parses: a step of
    max_step_tokens ids and positions takes at most 20 bytes a token as varints; the rest are far
    smaller than 1 MiB."""
    return max(1 << 20, 24 * limits.max_step_tokens)


def check_at_most(what: str, n: int, limit: int) -> None:
    """ValueError (INVALID_ARGUMENT) when one message asks for more than the agent ever takes."""
    if n > limit:
        raise ValueError(f"{what}: {n} exceeds this agent's limit of {limit}")


def check_in_range(what: str, values: list[int], low: int, high: int) -> None:
    """ValueError unless every value is in [low, high)."""
    if values and (min(values) < low or max(values) >= high):
        raise ValueError(f"{what} must be in [{low}, {high}), got values from {min(values)} to {max(values)}")


def check_step(cfg: MoeConfig, limits: AgentLimits, me: str, token_ids: Sequence[int], positions: Sequence[int],
               peers: Sequence[str]) -> None:
    """A step's new tokens (BeginStep) as the model and the limits allow, before any is embedded."""
    check_at_most("tokens in one step", len(token_ids), limits.max_step_tokens)
    if len(positions) != len(token_ids):
        raise ValueError(f"{len(token_ids)} token ids but {len(positions)} positions")
    check_in_range("positions", list(positions), 0, cfg.max_positions)
    check_at_most("agents in one step", len(peers), limits.max_peers)
    if me not in peers:
        raise ValueError(f"the step's agents must include this one ({me!r})")


def check_plan(cfg: MoeConfig, layer: int, mine: Mapping[int, Sequence[tuple[str, int]]], executes: Iterable[int],
               step_agents: Sequence[str], splits: Mapping[int, Sequence[str]] | None = None) -> None:
    """A layer's plan (LayerPlan: my experts' shares by executor, the experts I execute, and the
    experts run in slices) names experts of the model, executors of the step and slices an
    expert has, or is refused."""
    splits = splits or {}
    check_in_range(f"experts of layer {layer}'s plan", [*mine, *executes, *splits], 0, cfg.num_experts)
    for e, nodes in splits.items():
        if not 2 <= len(nodes) <= cfg.expert_size or len(set(nodes)) != len(nodes):
            raise ValueError(f"expert {e} of layer {layer} is split over {len(nodes)} agents; a split takes 2 to "
                             f"{cfg.expert_size} distinct agents")
    named = {x for shares in mine.values() for x, _ in shares} | {n for nodes in splits.values() for n in nodes}
    unknown = sorted(named - set(step_agents))
    if unknown:
        raise ValueError(f"the plan of layer {layer} names executors outside the step: {', '.join(unknown)}")


def check_kv_block(cfg: MoeConfig, layer: int, chunk: int, num_chunks: int, k: torch.Tensor, v: torch.Tensor,
                   pos: torch.Tensor) -> None:
    """A peer's K/V block (PushKV): a layer of the model, keys and values [rows, KVH, hd] of its
    shape, positions [rows] inside its context."""
    check_in_range("layer", [layer], 0, cfg.num_layers)
    rows = k.shape[0] if k.dim() else -1
    if k.shape != (rows, cfg.num_kv_heads, cfg.head_dim) or v.shape != k.shape or pos.shape != (rows,):
        raise ValueError(f"a K/V block must be keys and values [rows, {cfg.num_kv_heads}, {cfg.head_dim}] and "
                         f"positions [rows]; got {list(k.shape)}, {list(v.shape)}, {list(pos.shape)}")
    if not k.is_floating_point() or not v.is_floating_point() or pos.is_floating_point():
        raise ValueError(f"K/V must be floating point and positions integers; got {k.dtype}, {v.dtype}, {pos.dtype}")
    check_in_range("K/V positions", pos.tolist(), 0, cfg.max_positions)
    if not 0 <= chunk < num_chunks:
        raise ValueError(f"chunk {chunk} is outside [0, {num_chunks})")


class Touched(Protocol):
    touched: float  # monotonic time a message last named it


class RequestTable:
    """The prefill state of the requests on one agent, within its limits: a request is admitted
    while the agent holds fewer than max_requests (its decode caches, `decoding`, count too), K/V
    from peers is taken while the inbox has room, and state no message touched for the time to
    live is stale."""

    def __init__(self, agent: str, limits: AgentLimits, decoding: Mapping[str, Touched]) -> None:
        self.agent, self.limits, self.decoding = agent, limits, decoding
        self.states: dict[str, RequestState] = {}

    def get(self, request_id: str) -> RequestState:
        """A request's state, touched now; UnknownRequest if there is none."""
        state = self.states.get(request_id)
        if state is None:
            raise UnknownRequest(f"request {request_id!r} is unknown to agent {self.agent!r}")
        state.touched = time.monotonic()
        return state

    def open(self, request_id: str) -> RequestState:
        """A request's state, created if there is room (Overloaded if not), touched now."""
        self.admit(request_id)
        state = self.states.setdefault(request_id, RequestState(request_id))
        state.touched = time.monotonic()
        return state

    def pop(self, request_id: str) -> RequestState | None:
        return self.states.pop(request_id, None)

    def live(self) -> set[str]:
        """Every request with state here: prefill shards and decode caches."""
        return self.states.keys() | self.decoding.keys()

    def admit(self, request_id: str) -> None:
        """Room for state of one more request, or Overloaded."""
        if request_id not in self.live() and len(self.live()) >= self.limits.max_requests:
            raise Overloaded(f"agent {self.agent!r} holds {self.limits.max_requests} requests, its limit")

    def stale(self, now: float) -> list[str]:
        """The requests no message touched for the time to live."""
        held: list[tuple[str, Touched]] = [*self.states.items(), *self.decoding.items()]
        return sorted({r for r, s in held if now - s.touched > self.limits.request_ttl_s})

    def inbox_room(self, request_id: str, nbytes: int) -> None:
        """Overloaded unless the inbox can take `nbytes` more of K/V (UnknownRequest for a
        request with no state here)."""
        self.get(request_id)
        held = sum(s.inbox_bytes() for s in self.states.values())
        if held + nbytes > self.limits.max_inbox_bytes:
            raise Overloaded(f"agent {self.agent!r} holds {held} bytes of K/V not yet used; {nbytes} more would exceed "
                             f"its limit of {self.limits.max_inbox_bytes}")
