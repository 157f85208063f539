"""What a layer costs each agent: disk reads, expert compute, hidden states over the link.

Pure arithmetic on device profiles; the token scheduler minimises it, the benchmark derives its
lower bound from it, and a simulator can replay plans through it.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.types import NodeId

INF = float("inf")


@dataclass(frozen=True)
class AgentProfile:
    node: NodeId
    disk_bytes_per_s: float  # expert store read rate; 0 = unlimited
    link_bytes_per_s: float  # send rate; 0 = unlimited
    flops_per_s: float  # measured expert matmul speed (> 0)
    capacity_experts: int | None  # experts its buffer holds; None = unlimited

    def __post_init__(self) -> None:
        if self.flops_per_s <= 0:
            raise ValueError(f"flops_per_s of {self.node} must be > 0, got {self.flops_per_s}")

    def free_slots(self, taken: int) -> int | None:
        """Experts its buffer still has room for, given `taken` resident or being read (None:
        unlimited)."""
        return None if self.capacity_experts is None else self.capacity_experts - taken


@dataclass(frozen=True)
class CostModel:
    expert_bytes: int  # bytes read from disk to load one expert
    token_bytes: int  # bytes of one token's hidden state on the wire
    flops_per_token: float  # FLOPs of one expert on one token (2 * 3 * D * I for SwiGLU)

    def load_s(self, p: AgentProfile) -> float:
        return self.expert_bytes / p.disk_bytes_per_s if p.disk_bytes_per_s else 0.0

    def compute_s(self, p: AgentProfile, tokens: int) -> float:
        return tokens * self.flops_per_token / p.flops_per_s

    def send_s(self, p: AgentProfile, tokens: int) -> float:
        return tokens * self.token_bytes / p.link_bytes_per_s if p.link_bytes_per_s else 0.0


@dataclass
class AgentTime:
    """Seconds of each resource one agent spends on a layer; they overlap (separate threads and
    devices), so the agent finishes when the busiest one does."""

    disk_s: float = 0.0
    compute_s: float = 0.0
    link_s: float = 0.0

    @property
    def finish_s(self) -> float:
        return max(self.disk_s, self.compute_s, self.link_s)


def lower_bound_s(bytes_to_read: int, pooled_disk_bytes_per_s: float, pooled_compute_s: float) -> float:
    """The time no schedule can beat: every byte that must be read, at the pooled disk rate, or
    all the compute on the pooled compute (its duration given), whichever is longer."""
    read_s = bytes_to_read / pooled_disk_bytes_per_s if pooled_disk_bytes_per_s else 0.0
    return max(read_s, pooled_compute_s)
