"""What the agents' expert memory outside any placement reads, at the scheduler's word: fills of
the experts no agent holds into free memory (`fill.py`), and the decode prefetch pool-wide, the
cache memory following the running prompts (`decode_plan.prompt_cache`, docs/split.md).

    EngineService.refresh: poll -> PoolCache.cache_prompts -> PoolCache.fill -> publish_routing
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING

from protos.convert import expert_from_wire, expert_to_wire, experts_from_wire
from protos.ids import ExpertId
from scheduler.decode_plan import CacheRoom, prompt_cache
from scheduler.fill import AgentHoldings, holds_every
from scheduler.runner import ModelShape

if TYPE_CHECKING:
    from scheduler.service import EngineService

log = logging.getLogger("potluck.scheduler")


class PoolCache:
    def __init__(self, engine: EngineService) -> None:
        self.engine = engine  # its agents, their last snapshots, routing tables and running requests
        self.prefetched_experts = 0  # experts the pool-wide decode prefetch had agents read
        self._caching = asyncio.Lock()
        self._prefetching: dict[str, frozenset[int]] = {}  # per agent, the reads its plans began, not yet polled

    async def fill(self) -> None:
        """Ask the agents to read the experts none of them holds into their free memory (they
        read them in the background, at their disks' lowest priority); after every request,
        from the cache state the poll just brought."""
        shape = self.engine.shape
        agents = [c for c in self.engine.up_clients() if c.name in self.engine.infos]
        if shape is None or not agents:
            return
        E, clients, routed = shape.num_experts, {c.name: c for c in agents}, shape.routed_experts()
        expert_bytes = self.engine.infos[agents[0].name].expert_bytes
        # A pool whose memory holds every expert once should hold every one: slices (split runs
        # of experts no agent held) give their room to the fills, and second copies to the
        # experts still left over (`plan_swaps`).
        snaps = [self.engine.snapshots[c.name] for c in agents]
        whole = holds_every([s.capacity_bytes // expert_bytes if s.capacity_bytes else None for s in snaps], len(routed))
        holdings = [self._holdings(c.name, E, slices_free=whole) for c in agents]
        plan = self.engine.policy.fills(holdings, routed, expert_bytes, E)
        swaps = self.engine.policy.swaps(holdings, routed, plan) if whole else {}
        sent = []  # (agent, experts to read, copies to give up)
        for n in sorted(set(plan) | set(swaps)):
            reads, gone = swaps.get(n, ((), ()))
            sent.append((n, (*plan.get(n, ()), *reads), gone))
        results = await asyncio.gather(*(clients[n].fill([expert_to_wire(e, E) for e in es],
                                                         [expert_to_wire(e, E) for e in gone]) for n, es, gone in sent),
                                       return_exceptions=True)
        for (node, es, _), result in zip(sent, results):
            if isinstance(result, BaseException):  # only a lost chance to read ahead: the next request reads on demand
                log.warning("fill of %d experts on %s failed: %s", len(es), node, result)
            elif node in self.engine.snapshots:  # held from now on (being read), the copies given up gone
                snap = self.engine.snapshots[node]
                held = (snap.held | frozenset(result[0])) - frozenset(result[1])
                self.engine.snapshots[node] = dataclasses.replace(snap, held=held)

    def _holdings(self, name: str, num_experts: int, slices_free: bool = False) -> AgentHoldings:
        """What an agent holds and has room for; with `slices_free`, the room its slices take
        counts as free (a fill of a whole expert takes it, `ExpertBuffer.fill`)."""
        snap, info = self.engine.snapshots[name], self.engine.infos[name]
        free = None
        if snap.capacity_bytes:
            used = snap.bytes_used - (sum(info.expert_bytes // of for _, _, of in snap.slices) if slices_free else 0)
            free = max(0, snap.capacity_bytes - used) // info.expert_bytes
        return AgentHoldings(snap.name, experts_from_wire(snap.held, num_experts), free, info.disk_bytes_per_s,
                             experts_from_wire(snap.placed, num_experts))

    async def cache_prompts(self) -> None:
        """The decode prefetch, pool-wide (`decode_plan.prompt_cache`): the agents' cache memory
        takes the experts the running requests' prompts chose most (each request's counts
        weighing one), in place of entries they chose less. The entries to give up leave the
        routing table first, so that no home sends work to a holder about to drop them; the
        experts read join it at the first poll after their reads should be done."""
        if self.engine.shape is None or not self.engine.settings.decode_prefetch:
            return
        async with self._caching:  # one plan at a time, each seeing the reads the last one began
            await self._cache_prompts(self.engine.shape)

    async def _cache_prompts(self, shape: ModelShape) -> None:
        agents = [c for c in self.engine.up_clients() if c.name in self.engine.infos]
        routed = shape.routed_experts()
        prompts = [c for c in self.engine.batcher.prompt_counts() if len(c) == len(routed)]
        if not agents or not prompts:
            return
        counts: dict[ExpertId, float] = {}
        for flat in prompts:
            total = sum(flat)
            for eid, n in zip(routed, flat):
                if n:
                    counts[eid] = counts.get(eid, 0.0) + n / total
        E = shape.num_experts
        rooms = {}
        for c in agents:
            snap, info = self.engine.snapshots[c.name], self.engine.infos[c.name]
            held = snap.held | self._prefetching.get(c.name, frozenset())  # reads a plan began count
            rooms[c.name] = CacheRoom(experts_from_wire(held, E), experts_from_wire(snap.placed, E),
                                      snap.capacity_bytes // info.expert_bytes if snap.capacity_bytes else None)
        plan = prompt_cache(counts, rooms, len(routed))
        if not plan:
            return
        for node, (_, evict) in plan.items():  # unnamed before they go
            snap = self.engine.snapshots[node]
            self.engine.snapshots[node] = dataclasses.replace(snap, held=snap.held - {expert_to_wire(e, E) for e in evict})
        await self.engine.publish_routing()
        clients = {c.name: c for c in agents}
        sent = list(plan.items())
        results = await asyncio.gather(*(clients[n].fill([expert_to_wire(e, E) for e in loads],
                                                          [expert_to_wire(e, E) for e in evict], prefetch=True)
                                         for n, (loads, evict) in sent), return_exceptions=True)
        read_s, index = 0.0, {eid: i for i, eid in enumerate(routed)}
        read: set[int] = set()
        for (node, (loads, _)), result in zip(sent, results):
            if isinstance(result, BaseException):  # a prefetch lost: its experts are read on demand
                log.warning("decode prefetch of %d experts on %s failed: %s", len(loads), node, result)
                continue
            self.prefetched_experts += len(result[0])
            self._prefetching[node] = self._prefetching.get(node, frozenset()) | frozenset(result[0])
            read |= {index[expert_from_wire(i, E)] for i in result[0]}
            info = self.engine.infos[node]
            one = (info.expert_bytes / info.disk_bytes_per_s if info.disk_bytes_per_s
                   else self.engine.snapshots[node].expert_read_s)  # as throttled, else as measured
            read_s = max(read_s, len(result[0]) * one)
        known = {index[e] for r in rooms.values() for e in r.held}
        self.engine.batcher.prefetch.plan(E, frozenset(read), frozenset(i for i in index.values() if i not in known) - read)
        if read:
            self.engine.track(asyncio.create_task(self._republish_after(read_s)))

    async def _republish_after(self, seconds: float) -> None:
        """Holdings and the routing table once the decode prefetch's reads should be in."""
        await asyncio.sleep(seconds)
        await self.engine.poll(up_only=True)
        async with self._caching:  # the poll lists what they read, and what is still being read
            self._prefetching.clear()
        await self.engine.publish_routing()
