"""Split an owner's routed (token, slot) pairs among executing agents, as a routing plan says."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from protos.messages import RoutingPlan


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


def only(ids: torch.Tensor, experts: Iterable[int], keep: bool = True) -> torch.Tensor:
    """ids [T,k] with -1 in every slot whose expert is not in `experts` (keep=False: is in them)."""
    inside = torch.isin(ids, torch.tensor(sorted(experts), dtype=ids.dtype))
    return torch.where(inside if keep else ~inside, ids, torch.full_like(ids, -1))
