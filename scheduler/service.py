"""The engine process side: agent membership, the bounded request queue, and workers.

`EngineService` owns the gRPC clients, the worker tasks and a membership poller; each request
itself runs in `RequestRunner` (the loop), which only sees the clients it is handed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from protos.convert import expert_from_wire, expert_to_wire
from protos.ids import ExpertId, model_fingerprint
from scheduler.client import AgentClient, AgentInfo
from scheduler.errors import AgentFailed, ModelMismatch, NoAgentsAvailable, PromptTooLong, QueueFull
from scheduler.fill import AgentHoldings
from scheduler.policy import Policy
from scheduler.runner import ClusterView, ModelShape, RequestRunner
from scheduler.types import AgentSnapshot, EngineSnapshot, GenerationRequest, NodeSpec, TokenEvent

log = logging.getLogger("potluck.scheduler")


@dataclass(frozen=True)
class EngineSettings:
    max_waiting: int = 64  # queued requests beyond which submit answers QueueFull (429)
    max_running: int = 1  # requests computed at once
    poll_interval_s: float = 2.0  # how often agents' health and counters are refreshed
    call_timeout_s: float = 300.0  # deadline of one control call to an agent

    def __post_init__(self) -> None:
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")


@dataclass
class _Job:
    request: GenerationRequest
    events: asyncio.Queue[TokenEvent | BaseException | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    cancelled: bool = False


class EngineService:
    def __init__(self, model_dir: Path, nodes: Sequence[NodeSpec], settings: EngineSettings, policy: Policy = Policy()) -> None:
        self.policy = policy
        self.fingerprint = model_fingerprint(model_dir)
        self.settings = settings
        self.shape: ModelShape | None = None  # learnt from the first agent that answers Info
        self.clients = [AgentClient(n, settings.call_timeout_s) for n in nodes]
        self.infos: dict[str, AgentInfo] = {}
        self._snapshots: dict[str, AgentSnapshot] = {n.name: AgentSnapshot(n.name, n.address, False) for n in nodes}
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._running = 0
        self._durations: list[float] = []  # recent request durations, for Retry-After
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def context_length(self) -> int:
        if self.shape is None:
            raise NoAgentsAvailable("no agent has answered yet")
        return self.shape.max_positions

    async def start(self) -> None:
        await self.poll()
        if not self.up_clients():
            raise NoAgentsAvailable(f"no agent is reachable: {[c.spec.address for c in self.clients]}")
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.settings.max_running)]
        self._tasks.append(asyncio.create_task(self._poll_forever()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self.clients:
            await c.close()

    # Membership --------------------------------------------------------------------------

    def up_clients(self) -> list[AgentClient]:
        return [c for c in self.clients if self._snapshots[c.name].up]

    async def _check(self, client: AgentClient) -> AgentSnapshot:
        if client.name not in self.infos:
            info = await client.info()
            if info.fingerprint != self.fingerprint:
                raise ModelMismatch(f"agent {client.name} serves a different model (config {info.fingerprint}, expected {self.fingerprint})")
            self.infos[client.name] = info
            if self.shape is None:
                self.shape = ModelShape(info.num_layers, info.num_experts, info.vocab_size, info.dense_layers, info.max_positions)
        return await client.snapshot()

    async def poll(self) -> None:
        results = await asyncio.gather(*(self._check(c) for c in self.clients), return_exceptions=True)
        for client, result in zip(self.clients, results):
            was_up = self._snapshots[client.name].up
            if isinstance(result, AgentSnapshot):
                self._snapshots[client.name] = result
                if not was_up:
                    log.info("agent %s joined (%s)", client.name, client.spec.address)
            else:
                self._snapshots[client.name] = AgentSnapshot(client.name, client.spec.address, False)
                self.infos.pop(client.name, None)
                if was_up or isinstance(result, ModelMismatch):
                    log.warning("agent %s left: %s", client.name, result)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            await self.poll()

    def snapshot(self) -> EngineSnapshot:
        return EngineSnapshot(self._running, self._queue.qsize(), tuple(self._snapshots.values()))

    def _holdings(self, name: str, num_experts: int) -> AgentHoldings:
        snap, info = self._snapshots[name], self.infos[name]
        free = (snap.capacity_bytes - snap.bytes_used) // info.expert_bytes if snap.capacity_bytes else None
        held = frozenset(expert_from_wire(i, num_experts) for i in snap.held)
        return AgentHoldings(snap.name, held, free, info.disk_bytes_per_s)

    # Requests ----------------------------------------------------------------------------

    async def submit(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        n, m = len(request.prompt_token_ids), request.sampling.max_tokens
        if n == 0:
            raise ValueError("the prompt is empty")
        if n + m > self.context_length:
            raise PromptTooLong(n, m, self.context_length)
        if not self.up_clients():
            raise NoAgentsAvailable("no agent is reachable; check that the agents in the inventory are running")
        if self._queue.qsize() >= self.settings.max_waiting and self._running >= self.settings.max_running:
            raise QueueFull(self._queue.qsize(), self._retry_after())
        job = _Job(request)
        self._queue.put_nowait(job)
        return self._events(job)

    def _retry_after(self) -> float:
        recent = self._durations[-20:]
        mean = sum(recent) / len(recent) if recent else 1.0
        return max(1.0, mean * (self._queue.qsize() + 1) / self.settings.max_running)

    async def _events(self, job: _Job) -> AsyncIterator[TokenEvent]:
        try:
            while True:
                item = await job.events.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled = True
            if job.task is not None and not job.task.done():
                job.task.cancel()
                await asyncio.gather(job.task, return_exceptions=True)

    async def _worker(self) -> None:
        while True:
            job = await self._queue.get()
            if job.cancelled:
                continue
            self._running += 1
            start = time.monotonic()
            job.task = asyncio.create_task(self._run(job))
            try:
                await asyncio.gather(job.task, return_exceptions=True)
            finally:
                self._running -= 1
                self._durations = (self._durations + [time.monotonic() - start])[-20:]
            await self.poll()  # fresh counters for /metrics right after a request
            await self.fill()

    async def fill(self) -> None:
        """Ask the agents to read the experts none of them holds into their free memory (they
        read them in the background, at their disks' lowest priority); after every request,
        from the cache state the poll just brought."""
        shape = self.shape
        agents = [c for c in self.up_clients() if c.name in self.infos]
        if shape is None or not agents:
            return
        E = shape.num_experts
        experts = [ExpertId(layer, e) for layer in range(shape.num_layers) if layer not in shape.dense_layers
                   for e in range(E)]
        plan = self.policy.fills([self._holdings(c.name, E) for c in agents], experts,
                                 self.infos[agents[0].name].expert_bytes, E)
        clients = {c.name: c for c in agents}
        sent = list(plan.items())
        results = await asyncio.gather(*(clients[n].fill([expert_to_wire(e, E) for e in es]) for n, es in sent),
                                       return_exceptions=True)
        for (node, es), result in zip(sent, results):
            if isinstance(result, BaseException):  # only a lost chance to read ahead: the next request reads on demand
                log.warning("fill of %d experts on %s failed: %s", len(es), node, result)

    async def _run(self, job: _Job) -> None:
        agents = self.up_clients()
        try:
            if not agents:
                raise NoAgentsAvailable("no agent is reachable")
            view = ClusterView.from_infos([self.infos[a.name] for a in agents])
            runner = RequestRunner(agents, view, self.policy)
            async for event in runner.generate(job.request):
                job.events.put_nowait(event)
            job.events.put_nowait(None)
        except asyncio.CancelledError:
            log.info("request %s cancelled", job.request.request_id)
            raise
        except AgentFailed as exc:
            log.error("request %s failed: %s", job.request.request_id, exc)
            job.events.put_nowait(exc)
            asyncio.create_task(self.poll())  # mark the failed agent down promptly
        except Exception as exc:  # any other failure still reaches the client, never silently lost
            log.exception("request %s failed", job.request.request_id)
            job.events.put_nowait(exc)


async def start_engine(model_dir: Path, nodes: Sequence[NodeSpec], settings: EngineSettings,
                       policy: Policy | str = "sirius") -> EngineService:
    """Connect to the agents and start serving; raises NoAgentsAvailable if none answers."""
    service = EngineService(model_dir, nodes, settings, policy if isinstance(policy, Policy) else Policy.from_flags(policy))
    await service.start()
    return service
