"""From the cluster and the activation window to a placement decision (pure).

    AgentInfo of every agent up + Activations + the model's MoE layers and top_k
      -> problem_for(...)          the PlacementProblem (each agent's memory less one cache slot)
      -> a policy's place(problem) -> candidate P'
      -> decide(problem, P, P')    Replan: migrate iff cost(P') + migration(P -> P') < cost(P)

The costs are seconds (`expected_s`: the window's expert accesses under each placement, and
`migration_s`: moving the experts P' adds), so that the published rule, C(P') + C_mig < C(P),
compares like with like; `remote_calls` (the published C) is reported beside them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from protos.ids import ExpertId, NodeId
from protos.messages import AgentInfo
from scheduler.placement.problem import (Activations, Device, Placement, PlacementProblem, expected_s, migration_s,
                                         remote_calls)

CACHE_SLOTS = 1  # expert memory each agent keeps out of the placement (ExpertBuffer.place needs one)


def problem_for(infos: Sequence[AgentInfo], activations: Activations, moe_layers: Sequence[int],
                top_k: int, holdings: Mapping[NodeId, frozenset[ExpertId]] | None = None,
                split_unheld: bool = False, load_balance: bool = False) -> PlacementProblem:
    """The placement problem of these agents: each may place its expert memory less CACHE_SLOTS;
    one without a budget as many experts as it holds now (`holdings`), not the whole model, which
    would have every such agent read every expert. Statistics of homes not among them are left out."""
    first = infos[0]
    devices = []
    for a in infos:
        if a.memory_bytes:
            slots = a.memory_bytes // a.expert_bytes - CACHE_SLOTS
        else:
            slots = len((holdings or {}).get(a.name, frozenset()))
        devices.append(Device(a.name, max(slots, 0) * a.expert_bytes, a.disk_bytes_per_s, a.link_bytes_per_s,
                              a.link_latency_s, a.flops_per_s))
    names = {a.name for a in infos}
    kept = Activations({h: c for h, c in activations.counts.items() if h in names},
                       {h: p for h, p in activations.pairs.items() if h in names})
    return PlacementProblem(
        devices=tuple(devices), layers=tuple(moe_layers), num_experts=first.num_experts, top_k=top_k,
        expert_bytes=first.expert_bytes, token_bytes=first.hidden_size * first.dtype_bytes,
        flops_per_token=2.0 * first.expert_bytes / first.dtype_bytes,  # 3 matmuls of D x I (scheduler/runner.py)
        activations=kept, split_unheld=split_unheld, load_balance=load_balance,
    )  # fmt: skip


def sources(problem: PlacementProblem, holdings: Mapping[NodeId, frozenset[ExpertId]], node: NodeId,
            added: frozenset[ExpertId]) -> dict[ExpertId, NodeId]:
    """For each expert `node` gains, the agent holding it now to fetch it from, where that is
    faster than `node`'s own disk (the choice `migration_s` prices); the others are read."""
    target, nbytes = problem.device(node), problem.expert_bytes
    out = {}
    for e in sorted(added):
        # An unlimited disk (rate 0: not emulated, its real speed unknown) reads in no time here,
        # so a peer never beats it: a device's own disk is no slower than its LAN as a rule.
        best, best_s = None, target.read_s(nbytes)
        for src, held in sorted(holdings.items()):
            if src == node or e not in held or src not in {d.node for d in problem.devices}:
                continue
            s = problem.device(src)
            wire_s = s.link_latency_s + target.link_latency_s + max(s.send_s(nbytes), target.send_s(nbytes))
            if wire_s < best_s:
                best, best_s = src, wire_s
        if best is not None:
            out[e] = best
    return out


@dataclass(frozen=True)
class Replan:
    """One re-planning: the candidate, what each placement costs, and whether to move to it."""

    candidate: Placement  # the policy's placement for the window
    migrate: bool  # cost_new_s + migration_s < cost_now_s (or forced)
    cost_now_s: float  # expected seconds of the window's accesses under the current placement
    cost_new_s: float  # the same under the candidate
    migration_s: float  # device-seconds to move to the candidate
    remote_now: float  # C(P): accesses off their home under the current placement
    remote_new: float  # C(P')
    moves: Mapping[NodeId, tuple[frozenset[ExpertId], frozenset[ExpertId]]]  # node -> (experts added, dropped)
    expert_bytes: int  # one expert's weights

    @property
    def moved_experts(self) -> int:
        """Experts the agents gain (each read or sent once)."""
        return sum(len(added) for added, _ in self.moves.values())

    @property
    def migration_bytes(self) -> int:
        return self.moved_experts * self.expert_bytes


def decide(problem: PlacementProblem, current: Placement, candidate: Placement, force: bool = False) -> Replan:
    """Migrate to `candidate` iff its cost plus the migration's is below the current cost (the
    published rule); `force` migrates anyway (a cluster's first placement)."""
    now, new = expected_s(problem, current), expected_s(problem, candidate)
    move = migration_s(problem, current, candidate)
    nodes = set(current) | set(candidate)
    moves = {n: (candidate.get(n, frozenset()) - current.get(n, frozenset()),
                 current.get(n, frozenset()) - candidate.get(n, frozenset())) for n in sorted(nodes)}
    return Replan(candidate, force or new + move < now, now, new, move, remote_calls(problem, current),
                  remote_calls(problem, candidate), {n: m for n, m in moves.items() if m[0] or m[1]},
                  problem.expert_bytes)
