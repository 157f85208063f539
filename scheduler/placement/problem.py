"""What every placement policy takes and returns, and what a placement costs.

    Activations (per home agent: (token, expert) selections and co-selected pairs in a window)
      + Device (each agent's expert memory, disk, link and compute) + the model's shape
      = PlacementProblem  ->  a policy (prism, slimcaching, eplb, uniform, replicate-popular)
      ->  Placement (per agent: the experts it keeps resident, pinned)

A policy is a pure function `place(problem) -> Placement`: no clock, no I/O, no randomness. The
costs below are the objectives the policies minimise and the figures `/admin/placement` reports:

- `remote_calls(P)`: the published objective C(P), the expected number of expert calls that leave
  their home agent: the sum over homes and experts of the activation count where the home does
  not hold the expert.
- `expected_s(P)`: the same accesses weighed by what each costs under the device profiles, as
  the runtime serves them: a local expert its compute, a held one a round trip to its cheapest
  holder plus that holder's compute, one nobody holds a read from the home's own disk plus its
  compute.
- `migration_s(old, new)`: the seconds spent moving to `new`: every expert an agent gains comes
  from its own disk or from a holder in `old` over the link, whichever is faster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from protos.ids import ExpertId, NodeId
from scheduler.balance import Agent, Need, balance, finish_s
from scheduler.cost_model import AgentProfile, CostModel

# Per agent, the experts it keeps resident (pinned). An agent missing from the mapping holds none.
Placement = Mapping[NodeId, frozenset[ExpertId]]


@dataclass(frozen=True)
class Device:
    """One agent as placement sees it."""

    node: NodeId
    memory_bytes: int  # expert memory placement may fill (pins), bytes
    disk_bytes_per_s: float  # expert read rate; 0 = unlimited
    link_bytes_per_s: float  # send and receive rate; 0 = unlimited
    link_latency_s: float  # one way, seconds
    flops_per_s: float  # expert matmul speed, FLOP/s (> 0)

    def __post_init__(self) -> None:
        if self.memory_bytes < 0:
            raise ValueError(f"memory_bytes of {self.node} must be >= 0, got {self.memory_bytes}")
        if self.flops_per_s <= 0:
            raise ValueError(f"flops_per_s of {self.node} must be > 0, got {self.flops_per_s}")
        if min(self.disk_bytes_per_s, self.link_bytes_per_s, self.link_latency_s) < 0:
            raise ValueError(f"rates and latency of {self.node} must be >= 0")

    def read_s(self, nbytes: int) -> float:
        return nbytes / self.disk_bytes_per_s if self.disk_bytes_per_s else 0.0

    def send_s(self, nbytes: int) -> float:
        return nbytes / self.link_bytes_per_s if self.link_bytes_per_s else 0.0


@dataclass(frozen=True)
class Activations:
    """Routing statistics of a window, per home agent (the agent a request decodes on)."""

    counts: Mapping[NodeId, Mapping[ExpertId, float]]  # home -> expert -> (token, expert) selections
    # home -> (a, b) -> tokens that chose both a and b; same layer, a.index < b.index
    pairs: Mapping[NodeId, Mapping[tuple[ExpertId, ExpertId], float]] = field(default_factory=dict)

    def homes(self) -> list[NodeId]:
        return sorted(self.counts)

    def count(self, home: NodeId, expert: ExpertId) -> float:
        return self.counts.get(home, {}).get(expert, 0.0)

    def layer_counts(self, home: NodeId, layer: int, num_experts: int) -> list[float]:
        """The home's histogram over the experts of one layer."""
        own = self.counts.get(home, {})
        return [own.get(ExpertId(layer, e), 0.0) for e in range(num_experts)]

    def total(self) -> float:
        return sum(sum(c.values()) for c in self.counts.values())


@dataclass(frozen=True)
class PlacementProblem:
    devices: tuple[Device, ...]
    layers: tuple[int, ...]  # the MoE layers, ascending
    num_experts: int  # routed experts per MoE layer
    top_k: int  # experts each token selects per layer
    expert_bytes: int  # one expert's weights, bytes
    token_bytes: int  # one token's hidden state on the wire, bytes (each way of a remote call)
    flops_per_token: float  # one expert on one token, FLOPs
    activations: Activations
    split_unheld: bool = False  # an expert no agent holds may run split (--expert-split)
    load_balance: bool = False  # with split_unheld, the load balance chooses how (else split over every device)
    _unheld: dict[NodeId, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.devices:
            raise ValueError("placement needs at least one device")
        if len({d.node for d in self.devices}) != len(self.devices):
            raise ValueError("device names must be unique")
        if self.expert_bytes <= 0 or self.num_experts <= 0 or not 0 < self.top_k <= self.num_experts:
            raise ValueError("expert_bytes and num_experts must be > 0, top_k in [1, num_experts]")
        strangers = set(self.activations.counts) - {d.node for d in self.devices}
        if strangers:  # the caller keeps the statistics of agents still in the cluster
            raise ValueError(f"activations of homes that are not devices: {sorted(strangers)}")

    def experts(self) -> list[ExpertId]:
        return [ExpertId(layer, e) for layer in self.layers for e in range(self.num_experts)]

    def device(self, node: NodeId) -> Device:
        for d in self.devices:
            if d.node == node:
                return d
        raise KeyError(node)

    def slots(self, node: NodeId) -> int:
        """Experts the device's memory holds."""
        return self.device(node).memory_bytes // self.expert_bytes

    def compute_s(self, node: NodeId) -> float:
        """One expert on one token on the device."""
        return self.flops_per_token / self.device(node).flops_per_s

    def call_s(self, home: NodeId, holder: NodeId) -> float:
        """One token's remote expert call from home to holder: the hidden state out and back over
        both links, a latency each way, and the holder's compute."""
        h, o = self.device(home), self.device(holder)
        wire = h.send_s(self.token_bytes) + o.send_s(self.token_bytes)
        return h.link_latency_s + o.link_latency_s + 2 * wire + self.compute_s(holder)

    def access_s(self, placement: Placement, home: NodeId, expert: ExpertId) -> float:
        """What one (token, expert) selection of a request homed on `home` costs under the placement,
        as the runtime serves it: its compute where the home holds the expert, else a call to its
        cheapest holder, else (no agent holds it) a read from the home's own disk and its compute,
        or with `split_unheld` as it runs split (`unheld_s`). An unlimited disk (rate 0, as agents
        without emulation report) makes a read free, so only calls and compute weigh there."""
        if expert in placement.get(home, frozenset()):
            return self.compute_s(home)
        holders = [n for n, held in placement.items() if expert in held and n != home]
        if holders:
            return min(self.call_s(home, n) for n in holders)
        return self.unheld_s(home)

    def unheld_s(self, home: NodeId) -> float:
        """One selection of an expert no agent holds, for a request homed on `home`: read whole
        by the home; with `split_unheld`, the slowest of every device's slice (1/N of the read and
        of the compute, and a call for a device other than the home); with `load_balance` too,
        the run the load balance chooses for the decode tables (`balance.py`, one token, a split
        beating the best whole run by a round trip), whole on a faster disk or split over the
        devices that end it soonest. The same for every unheld expert: worked out once a home."""
        if (got := self._unheld.get(home)) is not None:
            return got
        h = self.device(home)
        if not self.split_unheld or len(self.devices) < 2:
            got = h.read_s(self.expert_bytes) + self.compute_s(home)
        elif not self.load_balance:
            n = len(self.devices)
            got = max(d.read_s(self.expert_bytes // n) + self.compute_s(d.node) / n
                      + (0.0 if d.node == home else self.call_s(home, d.node) - self.compute_s(d.node))
                      for d in self.devices)  # fmt: skip
        else:
            agents = [Agent(AgentProfile(d.node, d.disk_bytes_per_s, d.link_bytes_per_s, d.flops_per_s, None),
                            (h.link_latency_s + d.link_latency_s) / 2) for d in self.devices]
            cost = CostModel(self.expert_bytes, self.token_bytes, self.flops_per_token)
            need = [Need(ExpertId(-1, 0), 1)]
            run = balance(agents, home, cost, need, "auto", split_overhead_s=max(2 * a.latency_s for a in agents))
            got = finish_s(agents, home, cost, need, run)
        self._unheld[home] = got
        return got


def remote_calls(problem: PlacementProblem, placement: Placement) -> float:
    """C(P): activation counts of the experts their home does not hold."""
    return sum(c for home, counts in problem.activations.counts.items()
               for e, c in counts.items() if e not in placement.get(home, frozenset()))  # fmt: skip


def expected_s(problem: PlacementProblem, placement: Placement) -> float:
    """The window's expert accesses, each at what it costs under the placement (seconds)."""
    return sum(c * problem.access_s(placement, home, e)
               for home, counts in problem.activations.counts.items() for e, c in counts.items())  # fmt: skip


def migration_s(problem: PlacementProblem, old: Placement, new: Placement) -> float:
    """Device-seconds to go from `old` to `new`: each expert an agent gains is read from its own
    disk or sent by a holder in `old` (the holder's and the target's links both carry it), the
    faster of the two. Dropping an expert costs nothing."""
    total = 0.0
    for node, held in new.items():
        target = problem.device(node)
        for e in held - old.get(node, frozenset()):
            ways = [target.read_s(problem.expert_bytes)]
            for src, had in old.items():
                if e in had and src != node:
                    s = problem.device(src)
                    wire = max(s.send_s(problem.expert_bytes), target.send_s(problem.expert_bytes))
                    ways.append(s.link_latency_s + target.link_latency_s + wire)
            total += min(ways)
    return total


def check_placement(problem: PlacementProblem, placement: Placement) -> None:
    """ValueError unless every agent is a device of the problem, holds experts of the model
    only, and holds no more than its memory."""
    known = {d.node for d in problem.devices}
    layers = set(problem.layers)
    for node, held in placement.items():
        if node not in known:
            raise ValueError(f"placement names {node!r}, which is not a device of the problem")
        if len(held) > problem.slots(node):
            raise ValueError(f"{node} would hold {len(held)} experts; its memory holds {problem.slots(node)}")
        bad = [e for e in held if e.layer not in layers or not 0 <= e.index < problem.num_experts]
        if bad:
            raise ValueError(f"{node} would hold experts the model lacks: {sorted(bad)[:5]}")


def uncovered(problem: PlacementProblem, placement: Placement) -> list[ExpertId]:
    """The experts no agent holds."""
    held = set().union(*placement.values()) if placement else set()
    return [e for e in problem.experts() if e not in held]


def entropy_bits(counts: Iterable[float]) -> float:
    """Shannon entropy of a histogram, in bits (0 for an empty one)."""
    values = [c for c in counts if c > 0]
    total = sum(values)
    if total <= 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in values)
