"""Real node agents (real gRPC servers on loopback ports) in the test's event loop, enrolled in a
throwaway CA of the cluster's own: agents and scheduler speak mutual TLS, as they do by default."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from node_agent.expert_store import ExpertStore
from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig
from node_agent.service import AgentSettings, serve
from node_agent.throttle import Throttle
from protos.limits import CHANNEL_OPTIONS
from protos.security import SERVER_IDENTITY, Credentials, agent_identity, open_channel
from scheduler.client import AgentClient
from scheduler.policy import Policy
from scheduler.runner import ClusterView, ModelShape, RequestRunner
from scheduler.engine_settings import EngineSettings
from scheduler.service import EngineService
from scheduler.types import GenerationRequest, NodeId, NodeSpec, TokenEvent
from server.certs import ClusterCA, save_credentials
from server.launcher import free_port


@dataclass
class Enrolment:
    """The cluster's CA: certificates for more agents, and the server's identity."""

    ca: ClusterCA
    folder: Path
    server: Credentials

    @classmethod
    def create(cls, folder: Path) -> Enrolment:
        ca = ClusterCA.create(days=1)
        return cls(ca, folder, ca.issue(SERVER_IDENTITY, days=1))

    def agent(self, name: str, address: str, model_dir: Path, **settings: Any) -> AgentSettings:
        """Settings of an enrolled agent `name` listening on `address`."""
        certs = self.folder / name
        save_credentials(self.ca.issue(agent_identity(name), days=1), certs)
        return AgentSettings(listen=address, model_dir=model_dir, name=name, certs=certs, **settings)

    def client(self, spec: NodeSpec) -> AgentClient:
        return AgentClient(spec, creds=self.server)

    def channel(self, spec: NodeSpec, creds: Credentials | None = None) -> grpc.aio.Channel:
        """A raw channel to an agent, as the server (or as `creds`)."""
        return open_channel(spec.address, agent_identity(spec.name), creds or self.server, CHANNEL_OPTIONS)


@dataclass
class Cluster:
    model_dir: Path
    specs: list[NodeSpec]
    clients: list[AgentClient]
    view: ClusterView
    enrolment: Enrolment
    stops: list[asyncio.Event]  # set one to stop that agent (its server goes away, as a process's would)
    serving: list[asyncio.Task[None]]

    async def stop_agent(self, name: str) -> None:
        """Stop agent `name` and wait until it is gone."""
        i = [s.name for s in self.specs].index(NodeId(name))
        self.stops[i].set()
        await asyncio.gather(self.serving[i], return_exceptions=True)

    @property
    def shape(self) -> ModelShape:
        return self.view.shape

    def runner(self, policy: Policy = Policy()) -> RequestRunner:
        return RequestRunner(self.clients, self.view, policy)

    @contextlib.asynccontextmanager
    async def engine(self, policy: Policy = Policy(), **settings: Any) -> AsyncIterator[EngineService]:
        """The scheduler as the server runs it (its own clients, routing tables, continuous
        batching) over these agents."""
        settings.setdefault("credentials", self.enrolment.server)
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
                        link_rate: float = 0, link_latency_s: float = 0,
                        per_agent: Mapping[int, Mapping[str, Any]] | None = None) -> AsyncIterator[Cluster]:
    """`agents` agents with these settings; `per_agent` overrides AgentSettings fields of some
    (agent index -> fields)."""
    stops: list[asyncio.Event] = []
    tasks, specs = [], []
    certs = tempfile.TemporaryDirectory(prefix="potluck-test-certs-")
    enrolment = Enrolment.create(Path(certs.name))
    try:
        for i in range(agents):
            address = f"127.0.0.1:{free_port()}"
            ready = asyncio.Event()
            fields = {"expert_memory_bytes": expert_memory, "disk_bytes_per_s": disk_rate,
                      "link_bytes_per_s": link_rate, "link_latency_s": link_latency_s,
                      **(per_agent or {}).get(i, {})}  # fmt: skip
            settings = enrolment.agent(f"agent{i}", address, model_dir, **fields)
            stops.append(asyncio.Event())
            tasks.append(asyncio.create_task(serve(settings, ready=ready, stop=stops[-1])))
            await asyncio.wait([tasks[-1], asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
            if tasks[-1].done():
                tasks[-1].result()  # raise the agent's start-up error
            specs.append(NodeSpec(NodeId(f"agent{i}"), address))
        clients = [enrolment.client(s) for s in specs]
        view = ClusterView.from_infos([await c.info() for c in clients])
        yield Cluster(model_dir, specs, clients, view, enrolment, stops, tasks)
        for c in clients:
            await c.close()
    finally:
        for stop in stops:
            stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        certs.cleanup()


def expert_bytes(model_dir: Path) -> int:
    """Bytes of one expert of the model in the agents' default compute dtype (float32), as an
    agent reports them: from the checkpoint's header, without starting one."""
    return ExpertStore(Checkpoint(model_dir), MoeConfig.load(model_dir), torch.float32, Throttle(0)).expert_nbytes
