"""The placement loop: every `replan_every_s` (or when an admin asks), the activation window goes
through the placement policy and the migration rule (`scheduler/placement/replan.py`, pure), and
the agents whose experts change are sent their new placement (SetPlacement). The first re-plan
applies the policy's placement; later ones migrate only when the rule says it pays.

    EngineService --infos, holdings, window--> Placer.replan --Replan--> SetPlacement per agent
                                                                         --> holdings at the next
                                                                         poll --> routing table

Load before evict: an agent keeps its placed experts resident and reads the new ones in the
background, and the routing table names an agent as a holder only once it reports the expert
resident; until then calls go to the old holders, which keep their copies as cache until their
room is needed (a holder asked for an expert it dropped reads it back: slower, never wrong).
An agent gains an expert from its own disk, or from an agent holding it where that is faster
(`replan.sources`, as `migration_s` prices it); if the holder has dropped it meanwhile, from its
disk. An agent that rejoins (after a
restart) is sent its placement again when a poll finds it reporting another one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protos.convert import expert_to_wire
from protos.ids import ExpertId, NodeId
from protos.messages import AgentInfo
from scheduler.activations import ActivationWindow
from scheduler.client import AgentClient
from scheduler.errors import AgentFailed
from scheduler.placement import POLICIES
from scheduler.placement.problem import Placement, PlacementProblem
from scheduler.placement.replan import Replan, decide, problem_for, sources

log = logging.getLogger("potluck.scheduler")


@dataclass(frozen=True)
class PlacementSettings:
    policy: str = "prism"  # a name of scheduler.placement.POLICIES (--placement)
    replan_every_s: float = 300.0  # how often the window is re-planned (--replan-every)
    migration: bool = True  # False (--no-migration): the first placement stays
    stats_window_s: float | None = None  # the statistics a re-plan sees (--stats-window); None: one period

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"placement {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.replan_every_s <= 0:
            raise ValueError(f"replan_every_s must be > 0, got {self.replan_every_s}")
        if self.stats_window_s is not None and self.stats_window_s <= 0:
            raise ValueError(f"stats_window_s must be > 0, got {self.stats_window_s}")

    @property
    def window_s(self) -> float:
        """How far back the activation statistics reach: each re-plan sees the last period, or
        the window given."""
        return self.replan_every_s if self.stats_window_s is None else self.stats_window_s


class Placer:
    def __init__(self, settings: PlacementSettings, split_unheld: bool = False, load_balance: bool = False) -> None:
        self.settings = settings
        self.split_unheld = split_unheld  # experts no agent holds run split (--expert-split): their price
        self.load_balance = load_balance  # ... as the load balance chooses (else over every agent)
        self.placed: dict[NodeId, frozenset[ExpertId]] = {}  # what each agent was told to keep
        self.last: Replan | None = None
        self.last_at: float | None = None  # time.time() of the last replan
        self.replans = 0
        self.migrations = 0  # replans that moved experts
        self.migration_bytes = 0  # expert bytes the agents were asked to gain
        self._resending: set[NodeId] = set()

    async def replan(self, infos: Sequence[AgentInfo], clients: Mapping[NodeId, AgentClient], window: ActivationWindow,
                     holdings: Mapping[NodeId, frozenset[ExpertId]]) -> Replan | None:
        """Plan the agents `infos` for the window; migrate if the rule says so. None while the
        window is empty (nothing to place by)."""
        activations = window.activations(time.monotonic())
        if window.top_k is None or not infos or activations.total() == 0:
            return None
        problem = problem_for(infos, activations, window.moe_layers, window.top_k, holdings, self.split_unheld,
                              self.load_balance)
        current: Placement = {a.name: self.placed.get(a.name, holdings.get(a.name, frozenset())) for a in infos}
        # Seconds of pure Python on a large model (prism's local search: about 3 s for 26 layers of 64
        # experts on 4 agents): off the event loop, which streams every request's tokens.
        candidate = await asyncio.to_thread(POLICIES[self.settings.policy], problem)
        # The first placement is applied whatever the rule says: until then no placement is in
        # force, only what demand reads left in memory, and the rule guards moves between
        # placements. (Judged by the rule, eplb's and uniform's first placements on the
        # many-expert bench lost to the warm-up's cache, and the bench measured no placement.)
        first = not self.placed
        if not first and not self.settings.migration:
            replan = decide(problem, current, current)  # reported, never moved
        else:
            replan = decide(problem, current, candidate, force=first)
        self.replans += 1
        self.last, self.last_at = replan, time.time()
        if replan.migrate and (replan.moves or first):  # a first placement pins even what is resident
            await self._apply(replan, problem, holdings, clients, window.num_experts)
        log.info("placement %s: C(P) %.0f -> %.0f remote calls, %.3f -> %.3f s of expert accesses, migration "
                 "%.3f s: %s", self.settings.policy, replan.remote_now, replan.remote_new, replan.cost_now_s,
                 replan.cost_new_s, replan.migration_s,
                 f"moved {replan.moved_experts} experts" if replan.migrate and replan.moves else "kept")
        return replan

    async def _apply(self, replan: Replan, problem: PlacementProblem, holdings: Mapping[NodeId, frozenset[ExpertId]],
                     clients: Mapping[NodeId, AgentClient], num_experts: int) -> None:
        changed = [n for n, experts in replan.candidate.items() if n in clients and experts != self.placed.get(n)]

        async def send(node: NodeId) -> None:
            # What the agent should keep from now on; a poll that finds it keeping something else
            # (this call failed, or the agent restarted since) sends it again (`differs`).
            experts = self.placed[node] = replan.candidate.get(node, frozenset())
            fetch = sources(problem, holdings, node, experts - holdings.get(node, frozenset()))
            self._resending.add(node)
            try:
                await clients[node].set_placement(
                    [expert_to_wire(e, num_experts) for e in experts],
                    [(expert_to_wire(e, num_experts), src, clients[src].spec.address) for e, src in fetch.items()
                     if src in clients])
            except AgentFailed as exc:
                log.warning("placement: agent %s did not take its placement (sent again later): %s", node, exc)
            finally:
                self._resending.discard(node)

        await asyncio.gather(*(send(n) for n in changed))
        self.migrations += 1
        self.migration_bytes += replan.migration_bytes

    def cost(self) -> float | None:
        """C(P), the remote calls of the last window, of the placement the last re-plan left in
        force (None before one)."""
        last = self.last
        if last is None:
            return None
        return last.remote_new if last.migrate and last.moves else last.remote_now

    def differs(self, node: NodeId, reported: frozenset[int], num_experts: int) -> bool:
        """Whether an agent's reported placement is not the one it was told (it restarted, or a
        call was lost), and no resend to it is under way."""
        experts = self.placed.get(node)
        if experts is None or node in self._resending:
            return False
        return reported != {expert_to_wire(e, num_experts) for e in experts}

    async def resend(self, node: NodeId, client: AgentClient, num_experts: int) -> None:
        """Tell an agent its placement again (`differs`)."""
        experts = self.placed.get(node)
        if experts is None:
            return
        self._resending.add(node)
        try:
            await client.set_placement([expert_to_wire(e, num_experts) for e in experts])
            log.info("placement: agent %s had lost its placement; sent it again", node)
        except AgentFailed as exc:
            log.warning("placement: agent %s did not take its placement back: %s", node, exc)
        finally:
            self._resending.discard(node)

    def report(self, resident: Mapping[NodeId, frozenset[ExpertId]], moe_layers: Sequence[int],
               loading: Mapping[NodeId, frozenset[ExpertId]] | None = None) -> dict[str, Any]:
        """`GET /admin/placement`: per agent and MoE layer its pinned experts, the others it holds
        as cache, and the pinned ones not resident yet (`loading`: being read or fetched, or
        queued behind demand reads; `resident` holds experts resident or being read, and
        `loading` those being read); the last replan's costs."""
        agents = {}
        for node in sorted(set(self.placed) | set(resident)):
            pinned, held = self.placed.get(node, frozenset()), resident.get(node, frozenset())
            pending = pinned - (held - (loading or {}).get(node, frozenset()))
            agents[node] = {"layers": [{"layer": layer,
                                        "pinned": sorted(e.index for e in pinned if e.layer == layer),
                                        "cached": sorted(e.index for e in held - pinned if e.layer == layer),
                                        "loading": sorted(e.index for e in pending if e.layer == layer)}
                                       for layer in moe_layers]}  # fmt: skip
        last = self.last
        return {
            "policy": self.settings.policy, "replan_every_s": self.settings.replan_every_s,
            "migration": self.settings.migration, "replans": self.replans, "migrations": self.migrations,
            "migration_bytes": self.migration_bytes,
            "last": None if last is None else {
                "at": self.last_at, "migrated": last.migrate and bool(last.moves), "remote_calls": last.remote_now,
                "remote_calls_candidate": last.remote_new, "expected_s": last.cost_now_s,
                "expected_s_candidate": last.cost_new_s, "migration_s": last.migration_s,
                "moved_experts": last.moved_experts if last.migrate else 0,
            },
            "agents": agents,
        }  # fmt: skip
