"""Split an owner's routed (token, slot) pairs among executing agents, as a routing plan says,
and send each executor its share (`Executors`)."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from node_agent.executor import ExpertExecutor
from protos.ids import SliceId
from protos.messages import RoutingPlan

Rows = tuple[torch.Tensor, torch.Tensor]  # (token rows [m], their expert output [m, D]) to add to h


class ExpertCalls(Protocol):
    """A peer's RunExperts, as `name` at `address` (its name goes into any error)."""

    async def run_experts(self, name: str, address: str, request_id: str, layer: int, x: torch.Tensor,
                          ids: torch.Tensor, weights: torch.Tensor, decode: bool = False, part: int = 0,
                          of: int = 1, read_ahead: Sequence[SliceId] = ()) -> torch.Tensor: ...


@dataclass(frozen=True)
class LayerPlan:
    """One MoE layer's plan as one agent needs it."""

    mine: Mapping[int, Sequence[tuple[str, int]]] = field(default_factory=dict)
    # expert -> [(executor, tokens)] for this agent's own tokens; tokens 0 = all the rest.
    executes: frozenset[int] = frozenset()  # experts this agent runs for any owner (a slice of them too)
    splits: Mapping[int, Sequence[str]] = field(default_factory=dict)  # expert -> slice i's agent, for every owner

    @classmethod
    def of(cls, plan: RoutingPlan | None, me: str) -> LayerPlan:
        """My share of the scheduler's plan (None: no plan, every expert runs on its owner)."""
        if plan is None:
            return cls()
        mine = {e: list(shares) for (owner, e), shares in plan.shares.items() if owner == me}
        executes = {e for (_, e), shares in plan.shares.items() for x, _ in shares if x == me}
        executes |= {e for e, nodes in plan.splits.items() if me in nodes}
        return cls(mine, frozenset(executes), dict(plan.splits))


def split_by_executor(ids: torch.Tensor, plan: LayerPlan, me: str) -> dict[str, torch.Tensor]:
    """ids [T,k] -> {executor: ids [T,k] with -1 in the slots it does not run}. An expert absent
    from the plan runs here. Shares take the expert's pairs in row-major order."""
    names: list[str] = [me]
    assign = torch.zeros_like(ids)  # index into names, per (token, slot)
    for expert, shares in plan.mine.items():
        pairs = (ids == expert).nonzero()  # [m, 2] row-major
        start = 0
        for executor, tokens in shares:
            if executor not in names:
                names.append(executor)
            end = pairs.shape[0] if tokens <= 0 else min(pairs.shape[0], start + tokens)
            chunk = pairs[start:end]
            assign[chunk[:, 0], chunk[:, 1]] = names.index(executor)
            start = end
    out = {}
    for i, name in enumerate(names):
        sub = torch.where(assign == i, ids, torch.full_like(ids, -1))
        if bool((sub >= 0).any()):
            out[name] = sub
    return out


async def rows_with(rows: torch.Tensor, out: Awaitable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, their expert output) once an executor has answered: what `slots.with_rows` adds."""
    return rows, await out


def routed_rows(sub: torch.Tensor) -> torch.Tensor:
    """The token rows [m] of ids [T,k] with at least one slot not -1."""
    return (sub >= 0).any(dim=1).nonzero().flatten()


def only(ids: torch.Tensor, experts: Iterable[int], keep: bool = True) -> torch.Tensor:
    """ids [T,k] with -1 in every slot whose expert is not in `experts` (keep=False: is in them)."""
    inside = torch.isin(ids, torch.tensor(sorted(experts), dtype=ids.dtype))
    return torch.where(inside if keep else ~inside, ids, torch.full_like(ids, -1))


@dataclass(frozen=True)
class Executors:
    """Where an owner's pending MoE slots of one layer run: on this agent's executor, or sent to
    a peer of the step (its RunExperts). Each run gives (rows, outputs) to add at those rows."""

    me: str
    executor: ExpertExecutor
    peers: ExpertCalls
    addresses: Mapping[str, str]  # the step's agents
    request_id: str
    layer: int
    x: torch.Tensor  # the owner's MoE input [T, D]
    weights: torch.Tensor  # its routing weights [T, k]

    def whole(self, subs: Mapping[str, torch.Tensor]) -> list[Awaitable[Rows]]:
        """Each executor's share (executor -> ids [T,k] with -1 in the slots it does not run)."""
        runs: list[Awaitable[Rows]] = []
        for name, sub in sorted(subs.items()):
            rows = routed_rows(sub)
            if name == self.me:
                run = self.executor.execute(self.layer, self.x[rows], sub[rows], self.weights[rows])
            else:
                run = self.peers.run_experts(name, self.addresses[name], self.request_id, self.layer, self.x[rows],
                                             sub[rows], self.weights[rows])
            runs.append(rows_with(rows, run))
        return runs

    def slices(self, ids: torch.Tensor, splits: Mapping[int, Sequence[str]]) -> list[Awaitable[Rows]]:
        """The pairs of experts the plan splits (ids [T,k] with -1 in every other slot): slice i
        of each on its i-th agent, one batch per agent of a split; the partial outputs add up at
        their rows like any other."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for e in sorted(set(ids[ids >= 0].tolist())):
            groups.setdefault(tuple(splits[e]), []).append(e)
        runs: list[Awaitable[Rows]] = []
        for nodes, experts in groups.items():
            sub = only(ids, experts)
            rows = routed_rows(sub)
            xs, ids_, ws, of = self.x[rows], sub[rows], self.weights[rows], len(nodes)
            for part, node in enumerate(nodes):
                if node == self.me:
                    run = self.executor.execute_slices(self.layer, xs, ids_, ws, part, of)
                else:
                    run = self.peers.run_experts(node, self.addresses[node], self.request_id, self.layer, xs, ids_,
                                                 ws, part=part, of=of)
                runs.append(rows_with(rows, run))
        return runs
