"""Requests end cleanly on every agent: finished, cancelled mid-way, or failed."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from node_agent.service import serve
from protos.convert import tensor_to_proto
from protos.messages import DecodeSpan, Peer
from protos.potluck.v1 import agent_pb2 as pb
from protos.potluck.v1 import agent_pb2_grpc as pb_grpc
from scheduler.client import AgentClient
from scheduler.errors import AgentFailed, NoAgentsAvailable
from scheduler.batching import Batcher, BatchSettings
from scheduler.partition import contiguous_prefill
from scheduler.runner import ClusterView, RequestRunner
from scheduler.types import GenerationRequest, NodeId, NodeSpec, RequestId, SamplingParams
from tests.integration.cluster import Cluster, free_port, local_cluster


async def test_closing_the_stream_releases_the_request_on_every_agent(qwen_tiny: Path) -> None:
    async with local_cluster(qwen_tiny, 2) as cluster, cluster.engine() as engine:
        request = GenerationRequest(RequestId("cancel-me"), tuple(range(1, 30)), SamplingParams(max_tokens=50, temperature=0))
        stream = await engine.submit(request)
        got = [await stream.__anext__() for _ in range(3)]
        assert len(got) == 3
        assert sum([(await c.snapshot()).requests for c in cluster.clients]) >= 1  # its home holds it
        await stream.aclose()  # type: ignore[attr-defined]
        assert [(await c.snapshot()).requests for c in cluster.clients] == [0, 0]


@pytest.mark.parametrize("prefill", ["sequence-parallel", "home"])
async def test_a_dead_agent_fails_the_request_with_a_named_error(qwen_tiny: Path, prefill: str) -> None:
    """Sequence-parallel, every agent takes part; prefilled on its home, the dead agent is the
    home (the first in order)."""
    address = f"127.0.0.1:{free_port()}"
    stop, ready = asyncio.Event(), asyncio.Event()
    async with local_cluster(qwen_tiny, 1) as cluster:
        doomed = asyncio.create_task(serve(cluster.enrolment.agent("doomed", address, qwen_tiny), ready=ready, stop=stop))
        await ready.wait()
        victim = cluster.enrolment.client(NodeSpec(NodeId("doomed"), address))
        agents = [*cluster.clients, victim] if prefill == "sequence-parallel" else [victim, *cluster.clients]
        view = ClusterView.from_infos([await a.info() for a in agents])
        home_max = 0 if prefill == "sequence-parallel" else BatchSettings.home_prefill_max
        batcher = Batcher(lambda: (agents, view), settings=BatchSettings(home_prefill_max=home_max))
        stop.set()
        await doomed
        request = GenerationRequest(RequestId("r"), tuple(range(1, 20)), SamplingParams(max_tokens=4, temperature=0))
        with pytest.raises(AgentFailed, match="doomed"):
            async for _ in batcher.generate(request):
                pass
        await batcher.aclose()
        await victim.close()


@dataclass
class Doomed:
    """An agent the test stops while others still count on it."""

    client: AgentClient
    stop: asyncio.Event
    serving: asyncio.Task[None]

    async def kill(self) -> None:
        """Stop its server and wait until it is gone."""
        self.stop.set()
        await self.serving


@contextlib.asynccontextmanager
async def doomed_agent(cluster: Cluster) -> AsyncIterator[Doomed]:
    """An agent enrolled in `cluster`'s CA, apart from its agents."""
    address = f"127.0.0.1:{free_port()}"
    stop, ready = asyncio.Event(), asyncio.Event()
    settings = cluster.enrolment.agent("doomed", address, cluster.model_dir)
    serving = asyncio.create_task(serve(settings, ready=ready, stop=stop))
    await ready.wait()
    doomed = Doomed(cluster.enrolment.client(NodeSpec(NodeId("doomed"), address)), stop, serving)
    try:
        yield doomed
    finally:
        await doomed.kill()
        await doomed.client.close()


def failed_by(caller: AgentClient, doomed: AgentClient, method: str) -> str:
    """How an AgentFailed starts when `caller` reports that `doomed` failed."""
    return f"agent {doomed.name} ({doomed.spec.address}) failed (reported by agent {caller.name} during {method})"


async def test_a_peer_that_dies_mid_prefill_is_named_not_the_agent_that_called_it(qwen_tiny: Path) -> None:
    """The step begins on both agents, then one dies: the other's Forward fails pushing its K/V
    there, and the scheduler hears that the dead one failed (the caller only reports it)."""
    async with local_cluster(qwen_tiny, 1) as cluster, doomed_agent(cluster) as doomed:
        caller = cluster.clients[0]
        # The caller owns the earlier positions: it pushes its K/V to the doomed agent and waits on
        # none from it, so its Forward fails on the push, not on a wait.
        plan = contiguous_prefill(tuple(range(1, 21)), [caller.name, doomed.client.name])
        addresses = {c.name: c.spec.address for c in (caller, doomed.client)}
        peers = [Peer(s.node, addresses[s.node], min(s.positions), max(s.positions), 0) for s in plan.shards]
        await asyncio.gather(*(c.begin_step("r", plan, peers, all_logits=False) for c in (caller, doomed.client)))
        await doomed.kill()
        with pytest.raises(AgentFailed) as failed:
            await caller.forward("r", 0, None)
        assert str(failed.value).startswith(failed_by(caller, doomed.client, "Forward"))
        assert "PushKV" in str(failed.value)
        assert (failed.value.agent, failed.value.address) == ("doomed", doomed.client.spec.address)
        await caller.release("r")


async def test_a_kv_source_that_dies_before_decode_is_named_not_the_home(qwen_tiny: Path) -> None:
    """The home pulls the prompt's K/V from an agent that died after the prefill: its decode step
    fails, and the scheduler hears that the source failed."""
    async with local_cluster(qwen_tiny, 1) as cluster, doomed_agent(cluster) as doomed:
        home = cluster.clients[0]
        agents = [home, doomed.client]
        runner = RequestRunner(agents, ClusterView.from_infos([await a.info() for a in agents]))
        prompt = tuple(range(1, 21))
        await runner.run_step("r", contiguous_prefill(prompt, [a.name for a in agents]))
        await doomed.kill()
        await home.adopt_kv("r", len(prompt) + 4, len(prompt), [(doomed.client.name, doomed.client.spec.address)])
        with pytest.raises(AgentFailed) as failed:
            await home.decode_step([DecodeSpan(request_id=RequestId("r"), token_ids=(5,), position=len(prompt))])
        assert str(failed.value).startswith(failed_by(home, doomed.client, "DecodeStep"))
        assert "FetchKV" in str(failed.value)
        assert failed.value.agent == "doomed"
        await home.release("r")


async def test_a_bad_expert_batch_is_refused_with_invalid_argument(qwen_tiny: Path) -> None:
    """A peer's batch naming an expert the model lacks (or a layer without routed experts) is
    refused with a clear status, not an internal error from deep in the expert store."""
    cfg = json.loads((qwen_tiny / "config.json").read_text())
    x, w = tensor_to_proto(torch.zeros(2, cfg["hidden_size"])), tensor_to_proto(torch.full((2, 2), 0.5))
    bad_expert = tensor_to_proto(torch.tensor([[0, 1], [cfg["num_experts"], 0]], dtype=torch.int32))
    bad_layer = tensor_to_proto(torch.tensor([[0, 1], [1, 0]], dtype=torch.int32))
    async with local_cluster(qwen_tiny, 1) as cluster:
        async with cluster.enrolment.channel(cluster.specs[0]) as channel:
            stub = pb_grpc.NodeAgentStub(channel)
            for layer, ids, message in ((1, bad_expert, "expert ids must be in"),
                                        (cfg["num_hidden_layers"], bad_layer, "has no routed experts")):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.RunExperts(pb.ExpertBatch(request_id="r", layer=layer, hidden=x, expert_ids=ids, weights=w))
                assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert message in (failed.value.details() or "")


async def test_stopping_the_engine_ends_every_stream(qwen_tiny: Path) -> None:
    """A running and a queued request when the engine stops: both streams end with an error that
    says so, neither hangs."""
    async with local_cluster(qwen_tiny, 1) as cluster:
        async with cluster.engine(max_running=1) as engine:
            params = SamplingParams(max_tokens=200, temperature=0)
            running = await engine.submit(GenerationRequest(RequestId("run"), tuple(range(1, 30)), params))
            queued = await engine.submit(GenerationRequest(RequestId("wait"), tuple(range(1, 20)), params))
            await running.__anext__()
        for stream in (running, queued):
            with pytest.raises(NoAgentsAvailable, match="shutting down"):
                async for _ in stream:
                    pass
