"""Expert placement: which agent keeps which experts resident (pinned). `problem.py` has the
types and the costs; each policy is one module with a pure `place(problem) -> Placement`, named
here as `--placement` will name it."""

from __future__ import annotations

from collections.abc import Callable

from scheduler.placement import eplb, prism, replicate_popular, slimcaching, uniform
from scheduler.placement.problem import Placement, PlacementProblem

POLICIES: dict[str, Callable[[PlacementProblem], Placement]] = {
    "prism": prism.place,  # activation-aware, entropy-sized slots, coverage repair
    "slimcaching": slimcaching.place,  # storage-constrained caching: greedy (top-1), decomposition (top-k)
    "eplb": eplb.place,  # DeepSeek's load balancer: replicas by load, balanced packing
    "uniform": uniform.place,  # static expert parallelism, every expert once
    "replicate-popular": replicate_popular.place,  # every expert once, then the most popular everywhere
}
