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

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from node_agent.model.config import MoeConfig


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
