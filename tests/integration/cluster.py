"""Real node agents (real gRPC servers on loopback ports) in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node_agent.expert_store import ExpertStore
from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig
from node_agent.service import AgentSettings, serve
from node_agent.throttle import Throttle
from scheduler.client import AgentClient
from scheduler.policy import Policy
from scheduler.runner import ClusterView, ModelShape, RequestRunner
from scheduler.service import EngineService, EngineSettings
from scheduler.types import GenerationRequest, NodeId, NodeSpec, TokenEvent
from server.launcher import free_port


@dataclass
class Cluster:
    model_dir: Path
    specs: list[NodeSpec]
    clients: list[AgentClient]
    view: ClusterView

    @property
    def shape(self) -> ModelShape:
        return self.view.shape

    def runner(self, policy: Policy = Policy()) -> RequestRunner:
        return RequestRunner(self.clients, self.view, policy)

    @contextlib.asynccontextmanager
    async def engine(self, policy: Policy = Policy(), **settings: Any) -> AsyncIterator[EngineService]:
        """The scheduler as the server runs it (its own clients, routing tables, continuous
        batching) over these agents."""
        service = EngineService(self.model_dir, self.specs, EngineSettings(**settings), policy)
        await service.start()
        try:
            yield service
        finally:
            await service.stop()

    async def generate(self, request: GenerationRequest, policy: Policy = Policy(), **settings: Any) -> list[TokenEvent]:
        """One request's tokens through a fresh engine."""
        async with self.engine(policy, **settings) as engine:
            return [event async for event in await engine.submit(request)]


@contextlib.asynccontextmanager
async def local_cluster(model_dir: Path, agents: int, expert_memory: int = 0, disk_rate: float = 0,
                        link_rate: float = 0, link_latency_s: float = 0) -> AsyncIterator[Cluster]:
    stop = asyncio.Event()
    tasks, specs = [], []
    try:
        for i in range(agents):
            address = f"127.0.0.1:{free_port()}"
            ready = asyncio.Event()
            settings = AgentSettings(listen=address, model_dir=model_dir, name=f"agent{i}", expert_memory_bytes=expert_memory,
                                     disk_bytes_per_s=disk_rate, link_bytes_per_s=link_rate,
                                     link_latency_s=link_latency_s)
            tasks.append(asyncio.create_task(serve(settings, ready=ready, stop=stop)))
            await asyncio.wait([tasks[-1], asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
            if tasks[-1].done():
                tasks[-1].result()  # raise the agent's start-up error
            specs.append(NodeSpec(NodeId(f"agent{i}"), address))
        clients = [AgentClient(s) for s in specs]
        view = ClusterView.from_infos([await c.info() for c in clients])
        yield Cluster(model_dir, specs, clients, view)
        for c in clients:
            await c.close()
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


def expert_bytes(model_dir: Path) -> int:
    """Bytes of one expert of the model in the agents' default compute dtype (float32), as an
    agent reports them: from the checkpoint's header, without starting one."""
    return ExpertStore(Checkpoint(model_dir), MoeConfig.load(model_dir), torch.float32, Throttle(0)).expert_nbytes
