"""The engine process side: agent membership, routing tables, the bounded request queue.

`EngineService` owns the gRPC clients, the membership poller (which also publishes the routing
table of which agent holds which expert whenever it changes) and the continuous-batching loop
(`Batcher`, which only sees the clients it is handed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from protos.convert import expert_from_wire, experts_from_wire
from protos.ids import ExpertId, SliceId, model_fingerprint
from scheduler.client import AgentClient, AgentInfo
from scheduler.errors import AgentFailed, JoinRefused, NoAgentsAvailable, PromptTooLong, QueueFull, why_unable
from scheduler.policy import Policy
from protos.routing import RoutingTable
from protos.security import probe_peer
from scheduler.activations import ActivationWindow
from scheduler.batching import Batcher
from scheduler.engine_settings import EngineSettings
from scheduler.placer import Placer
from scheduler.decode_plan import Measured, RunsMemo, data_address, home_runs, routing_table, same_holders
from scheduler.pool_cache import PoolCache
from scheduler.runner import ClusterView, ModelShape
from scheduler.types import AgentSnapshot, EngineSnapshot, GenerationRequest, NodeId, NodeSpec, TokenEvent

log = logging.getLogger("potluck.scheduler")

STATS_BUCKETS = 5  # the activation window moves in steps of a fifth of its length

JoinHook = Callable[[NodeId, AgentInfo], None]  # an agent joined, and what it reported about itself


class EngineService:
    def __init__(self, model_dir: Path, nodes: Sequence[NodeSpec], settings: EngineSettings, policy: Policy = Policy(),
                 on_join: JoinHook | None = None) -> None:
        # Prefill's token scheduling splits unheld experts as decode does, by the load balance.
        self.policy = policy = dataclasses.replace(policy, split=settings.expert_split if settings.load_balance else "never")
        self.on_join = on_join  # told of each agent that joins, with what it reported (Info)
        self.model_dir = model_dir
        self.fingerprint = model_fingerprint(model_dir)
        self.settings = settings
        self.shape: ModelShape | None = None  # learnt from the first agent that answers Info
        self.clients = [AgentClient(n, settings.call_timeout_s, settings.credentials) for n in nodes]
        self.infos: dict[str, AgentInfo] = {}
        self._snapshots: dict[str, AgentSnapshot] = {n.name: AgentSnapshot(n.name, n.address, False, problem="not polled yet")
                                                     for n in nodes}
        self.batcher = Batcher(self._cluster, policy, settings.batch, on_prefilled=self.refresh,
                               unheld_read_s=self._unheld_read_s, on_agent_failed=self._agent_failed,
                               on_selections=self._selections)
        self.activations: ActivationWindow | None = None  # once the model's shape is known
        self.placer = Placer(settings.placement, split_unheld=settings.expert_split != "never",
                             load_balance=settings.load_balance)
        self.table = RoutingTable()  # the routing table last published to the agents (each with its own runs)
        self.runs: dict[NodeId, dict[ExpertId, tuple[NodeId, ...]]] = {}  # the load balance's runs each home was sent
        self.runs_memo = RunsMemo()  # the balance's answers, reused from one table to the next
        self._durations: list[float] = []  # recent request durations, for Retry-After
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._refreshing: asyncio.Task[None] | None = None
        self._publishing = asyncio.Lock()  # one table at a time, each numbered after the last
        self._draining: list[AgentClient] = []  # removed from the inventory, still used by running requests
        self.pool = PoolCache(self)  # what the agents' free and cache memory reads: fills, the decode prefetch

    @property
    def context_length(self) -> int:
        if self.shape is None:
            raise NoAgentsAvailable("no agent has answered yet")
        return self.shape.max_positions

    async def start(self) -> None:
        await self.poll()
        if not self.up_clients():
            why = "; ".join(f"{s.name} at {s.address}: {s.problem}" for s in self._snapshots.values())
            raise NoAgentsAvailable(f"no agent of the inventory can serve ({why})")
        await self.publish_routing()
        self._tasks.append(asyncio.create_task(self._poll_forever()))
        self._tasks.append(asyncio.create_task(self._replan_forever()))

    async def stop(self) -> None:
        await self.batcher.aclose()
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        for c in [*self.clients, *self._draining]:
            await c.close()

    def set_nodes(self, nodes: Sequence[NodeSpec]) -> str:
        """Take a new inventory without a restart: new nodes join at the next poll; a removed
        node (or one whose address changed) takes no new request and leaves once the requests
        using it are done (drained); labels update in place. Returns what changed, for the log."""
        old = {c.name: c for c in self.clients}
        new = {n.name: n for n in nodes}
        kept, added, removed = [], [], []
        for name, client in old.items():
            spec = new.get(name)
            if spec is not None and spec.address == client.spec.address:
                client.spec = spec  # labels
                kept.append(client)
            else:
                removed.append(name)
                self._draining.append(client)
                self._snapshots.pop(name, None)
                self.infos.pop(name, None)
        for name, spec in new.items():
            if name not in old or old[name].spec.address != spec.address:
                added.append(name)
                kept.append(AgentClient(spec, self.settings.call_timeout_s, self.settings.credentials))
                self._snapshots[name] = AgentSnapshot(name, spec.address, False, problem="not polled yet")
        order = {n.name: i for i, n in enumerate(nodes)}
        self.clients = sorted(kept, key=lambda c: order[c.name])
        self._refresh_soon()
        return f"added {', '.join(added) or 'none'}; draining {', '.join(removed) or 'none'}"

    async def _close_drained(self) -> None:
        """Close the removed agents' channels once no running request uses them."""
        busy = {n for s in self.batcher.running for n in s.members} | \
            {s.home.name for s in self.batcher.running if s.home is not None}
        for client in [c for c in self._draining if c.name not in busy]:
            self._draining.remove(client)
            await client.close()
            log.info("agent %s drained and removed", client.name)

    # Membership --------------------------------------------------------------------------

    def up_clients(self) -> list[AgentClient]:
        return [c for c in self.clients if self._snapshots[c.name].up]

    async def _check(self, client: AgentClient) -> AgentSnapshot:
        if client.name not in self.infos:
            try:
                info = await client.info()
            except AgentFailed as exc:
                raise await self._refusal(client) or exc
            if info.name != client.name:
                raise JoinRefused(f"the agent at {client.spec.address} is named {info.name!r} but the inventory "
                                  f"names {client.name!r} there: start it with --name {client.name}, or fix the "
                                  f"inventory")
            if info.fingerprint != self.fingerprint:
                raise JoinRefused(f"agent {client.name} serves another checkpoint (fingerprint {info.fingerprint}; "
                                  f"the server's {self.model_dir} is {self.fingerprint}): give the agent the same "
                                  f"model folder (--model)")
            self.infos[client.name] = info
            if self.shape is None:
                self.shape = ModelShape(info.num_layers, info.num_experts, info.vocab_size, info.dense_layers, info.max_positions)
                moe_layers = [layer for layer in range(info.num_layers) if layer not in info.dense_layers]
                window = self.settings.placement.window_s
                self.activations = ActivationWindow(moe_layers, info.num_experts, window, window / STATS_BUCKETS)
        return await client.snapshot()

    async def _refusal(self, client: AgentClient) -> JoinRefused | None:
        """Why the TLS handshake with an agent failed, if it did: the agent of another name, or
        outside the cluster's CA, or without TLS (None: it did not answer at all)."""
        creds = self.settings.credentials
        found = await probe_peer(client.spec.address, creds) if creds is not None else None
        if found is None or found == f"agent {client.name}":
            return None
        if found.startswith("agent "):
            return JoinRefused(f"the agent at {client.spec.address} is named {found[6:]!r} but the inventory names "
                               f"{client.name!r} there: start it with --name {client.name} and that node's "
                               f"certificates, or fix the inventory")
        fix = "start it with --certs" if found == "no TLS" else "give it this cluster's certificates"
        return JoinRefused(f"the agent at {client.spec.address} ({client.name}) has {found}: {fix} (potluck certs "
                           f"--out DIR: DIR/nodes/{client.name}), or serve everyone with --insecure")

    async def poll(self, up_only: bool = False) -> None:
        """Ask every agent (with up_only, those up: a refresh between requests must not wait on
        one that is down, which may not answer for seconds) for its counters and holdings."""
        clients = list(self.up_clients() if up_only else self.clients)  # a reload may replace the list meanwhile
        results = await asyncio.gather(*(self._check(c) for c in clients), return_exceptions=True)
        for client, result in zip(clients, results):
            if client not in self.clients:
                continue  # removed while it was asked
            before = self._snapshots[client.name]
            if isinstance(result, AgentSnapshot):
                self._snapshots[client.name] = result
                E = self.infos[client.name].num_experts
                if self.placer.differs(client.name, result.placed, E):  # restarted: its memory is new
                    self.track(asyncio.create_task(self.placer.resend(client.name, client, E)))
                if not before.up:
                    log.info("agent %s joined (%s)", client.name, client.spec.address)
                    if self.on_join is not None:
                        self.on_join(client.name, self.infos[client.name])
            else:
                problem = why_unable(result)
                self._snapshots[client.name] = AgentSnapshot(client.name, client.spec.address, False, problem=problem,
                                                             labels=client.spec.labels)
                self.infos.pop(client.name, None)
                if before.up:
                    log.warning("agent %s left: %s", client.name, problem)
                    self.batcher.agent_down(client.name, f"agent {client.name} stopped answering: {problem}")
                elif problem != before.problem and self._tasks:  # once per new reason (start raises instead)
                    log.warning("agent %s is not serving: %s", client.name, problem)

    def _agent_failed(self, name: NodeId, why: str) -> None:
        """A request's step saw `name` fail: out of the cluster now (no new request is placed on
        it, routing tables drop it), back once a poll finds it answering again."""
        before = self._snapshots.get(name)
        if before is None or not before.up:
            return
        log.warning("agent %s failed; serving on the others until it answers again: %s", name, why)
        self._snapshots[name] = AgentSnapshot(name, before.address, False, problem=f"failed: {why.splitlines()[0]}",
                                              labels=before.labels)
        self.infos.pop(name, None)  # checked again (Info) when it comes back
        self.batcher.agent_down(name, why)
        self._refresh_soon()  # routing tables without it

    async def _replan_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.placement.replan_every_s)
            await self.replan()

    async def replan(self) -> dict[str, Any]:
        """Re-plan the placement from the activation window now (every --replan-every, or
        POST /admin/replan); returns the placement report."""
        if self.activations is not None:
            up = [c for c in self.up_clients() if c.name in self.infos]
            replan = await self.placer.replan([self.infos[c.name] for c in up], {c.name: c for c in up},
                                              self.activations, self._resident())
            if replan is not None and replan.migrate:
                self._refresh_soon()  # the routing tables follow as the new copies come in
        return self.placement_report()

    def placement_report(self) -> dict[str, Any]:
        """`GET /admin/placement`."""
        layers = self.activations.moe_layers if self.activations is not None else ()
        return self.placer.report(self._resident(), layers, self._resident(loading=True))

    def _resident(self, loading: bool = False) -> dict[NodeId, frozenset[ExpertId]]:
        """Each agent up's experts as last polled: resident or being read (`loading`: being read)."""
        if self.shape is None:
            return {}
        E, out = self.shape.num_experts, {}
        for client in self.up_clients():
            snapshot = self._snapshots[client.name]
            out[client.name] = experts_from_wire(snapshot.loading if loading else snapshot.held, E)
        return out

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            await self.poll()
            await self.publish_routing()
            await self._close_drained()

    def snapshot(self) -> EngineSnapshot:
        p = self.placer
        tally = self.batcher.prefetch
        return EngineSnapshot(len(self.batcher.running), len(self.batcher.waiting), tuple(self._snapshots.values()),
                              p.migrations, p.migration_bytes, p.cost(), prefetch_experts=self.pool.prefetched_experts,
                              prefetch_hits=tally.hits, prefetch_misses=tally.misses, unheld_experts=self._unheld())

    def _unheld(self) -> int | None:
        """Routed experts that no agent up holds or is reading, as last polled."""
        if self.shape is None:
            return None
        held = frozenset().union(*self._resident().values())
        return len(set(self.shape.routed_experts()) - held)

    def _selections(self, home: NodeId, selections: torch.Tensor) -> None:
        """A decode step's expert choices, into the activation window."""
        if self.activations is None:
            return
        try:
            self.activations.add(home, selections, time.monotonic())
        except ValueError as exc:  # a malformed reply costs the statistics, not the request
            log.warning("agent %s reported selections the statistics cannot use: %s", home, exc)

    def activation_stats(self) -> dict[str, Any]:
        if self.activations is None:
            return {"window_s": self.settings.placement.window_s, "homes": {}}
        return self.activations.to_json(time.monotonic())

    def _unheld_read_s(self, node: NodeId) -> float:
        """Seconds `node`'s disk would take to read every routed expert no agent holds (as the
        last poll and the fills since saw them)."""
        info = self.infos.get(node)
        if self.shape is None or info is None or not info.disk_bytes_per_s:
            return 0.0
        routed = (self.shape.num_layers - len(self.shape.dense_layers)) * self.shape.num_experts
        held = frozenset().union(*(s.held for s in self._snapshots.values() if s.up))
        return max(0, routed - len(held)) * info.expert_bytes / info.disk_bytes_per_s

    def _cluster(self) -> tuple[list[AgentClient], ClusterView | None]:
        """The agents up now and their view (for a request being admitted)."""
        agents = [c for c in self.up_clients() if c.name in self.infos]
        return agents, ClusterView.from_infos([self.infos[a.name] for a in agents]) if agents else None

    def _home_runs(self, agents: Sequence[AgentClient], held: Mapping[NodeId, frozenset[ExpertId]]
                   ) -> Callable[[], dict[NodeId, dict[ExpertId, tuple[NodeId, ...]]]] | None:
        """Per home, where the load balance runs the experts it lacks (None without it): the work, on the inputs of now."""
        if self.shape is None or not self.settings.load_balance or len(agents) < 2:
            return None
        E, view = self.shape.num_experts, ClusterView.from_infos([self.infos[a.name] for a in agents])
        snaps = {a.name: self._snapshots[a.name] for a in agents}
        slices = {n: frozenset(SliceId(expert_from_wire(e, E), p, o) for e, p, o in s.slices) for n, s in snaps.items()}
        return functools.partial(home_runs, view.profiles, {a.name: self.infos[a.name].link_latency_s for a in agents},
                                 {n: Measured(s.expert_read_s, s.round_trip_s) for n, s in snaps.items()}, view.cost,
                                 self.shape.routed_experts(), held, slices, self.settings.expert_split, self.runs_memo)

    async def publish_routing(self) -> None:
        """Send every agent the table of which agent holds which expert, if it changed since
        the last one (from the holdings the last poll brought)."""
        if self.shape is None:
            return
        async with self._publishing:
            E = self.shape.num_experts
            agents = [c for c in self.up_clients() if c.name in self.infos]
            held = {c.name: experts_from_wire(self._snapshots[c.name].held, E) for c in agents}
            data = {c.name: a for c in agents if (a := data_address(c.spec.address, self.infos[c.name].data_port))}
            table = routing_table(self.table.version + 1, {c.name: c.spec.address for c in agents}, held, data,
                                  self.settings.expert_split, self.settings.decode_prefetch, self.settings.load_balance)
            # Pure Python, seconds from nothing with 8 agents on a 48-layer, 128-expert model (RunsMemo): off the loop.
            runs = {} if (job := self._home_runs(agents, held)) is None else await asyncio.to_thread(job)
            if same_holders(table, self.table) and runs == self.runs:
                return
            self.table, self.runs = table, runs
            results = await asyncio.gather(*(c.set_routing_table(dataclasses.replace(table, runs=runs.get(c.name, {})),
                                                                 E) for c in agents), return_exceptions=True)
        for client, result in zip(agents, results):
            if isinstance(result, BaseException):  # a stale table costs time, never correctness
                log.warning("routing table %d not delivered to %s: %s", table.version, client.name, result)

    async def refresh(self) -> None:
        """Fresh holdings, the running prompts' experts, fills of what no agent holds, and the
        routing table: after a prefill (before its decode starts) and after a request."""
        await self.poll(up_only=True)
        await self.cache_prompts()
        await self.fill()
        await self.publish_routing()

    async def fill(self) -> None:
        await self.pool.fill()

    async def cache_prompts(self) -> None:
        await self.pool.cache_prompts()

    @property
    def snapshots(self) -> dict[str, AgentSnapshot]:
        """What each agent last reported (the pool's plans update it as they send)."""
        return self._snapshots

    def track(self, task: asyncio.Task[None]) -> None:
        """A background task of the engine's, cancelled when it stops."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _refresh_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self.refresh())
            self.track(self._refreshing)

    # Requests ----------------------------------------------------------------------------

    async def submit(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        n, m = len(request.prompt_token_ids), request.sampling.max_tokens
        if n == 0:
            raise ValueError("the prompt is empty")
        if n + m > self.context_length:
            raise PromptTooLong(n, m, self.context_length)
        if not self.up_clients():
            raise NoAgentsAvailable("no agent is reachable; check that the agents in the inventory are running")
        waiting, running = len(self.batcher.waiting), len(self.batcher.running)
        # Queued as accepted, so this counts every one: at most max_running run, max_waiting wait.
        if waiting + running >= self.settings.max_waiting + self.settings.max_running:
            raise QueueFull(waiting, self._retry_after())
        start = time.monotonic()

        def closed() -> None:
            self._durations = (self._durations + [time.monotonic() - start])[-20:]
            self._refresh_soon()  # fresh counters for /metrics, fills, routing table; a failed agent marked down

        return self.batcher.submit(request, on_close=closed)

    def _retry_after(self) -> float:
        recent = self._durations[-20:]
        mean = sum(recent) / len(recent) if recent else 1.0
        return max(1.0, mean * (len(self.batcher.waiting) + 1) / self.settings.max_running)



async def start_engine(model_dir: Path, nodes: Sequence[NodeSpec], settings: EngineSettings,
                       policy: Policy | str = "sirius", on_join: JoinHook | None = None) -> EngineService:
    """Connect to the agents and start serving; raises NoAgentsAvailable if none answers."""
    service = EngineService(model_dir, nodes, settings, policy if isinstance(policy, Policy) else Policy.from_flags(policy),
                            on_join)
    await service.start()
    return service

