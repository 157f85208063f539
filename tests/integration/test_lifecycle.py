"""Requests end cleanly on every agent: finished, cancelled mid-way, or failed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
import torch

from node_agent.service import AgentSettings, serve
from protos.convert import tensor_to_proto
from protos.potluck.v1 import agent_pb2 as pb
from protos.potluck.v1 import agent_pb2_grpc as pb_grpc
from scheduler.client import AgentClient
from scheduler.errors import AgentFailed
from scheduler.batching import Batcher
from scheduler.runner import ClusterView
from scheduler.types import GenerationRequest, NodeId, NodeSpec, RequestId, SamplingParams
from tests.integration.cluster import free_port, local_cluster


async def test_closing_the_stream_releases_the_request_on_every_agent(qwen_tiny: Path) -> None:
    async with local_cluster(qwen_tiny, 2) as cluster, cluster.engine() as engine:
        request = GenerationRequest(RequestId("cancel-me"), tuple(range(1, 30)), SamplingParams(max_tokens=50, temperature=0))
        stream = await engine.submit(request)
        got = [await stream.__anext__() for _ in range(3)]
        assert len(got) == 3
        assert sum([(await c.snapshot()).requests for c in cluster.clients]) >= 1  # its home holds it
        await stream.aclose()  # type: ignore[attr-defined]
        assert [(await c.snapshot()).requests for c in cluster.clients] == [0, 0]


async def test_a_dead_agent_fails_the_request_with_a_named_error(qwen_tiny: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    stop, ready = asyncio.Event(), asyncio.Event()
    async with local_cluster(qwen_tiny, 1) as cluster:
        doomed = asyncio.create_task(serve(AgentSettings(listen=address, model_dir=qwen_tiny, name="doomed"), ready=ready, stop=stop))
        await ready.wait()
        victim = AgentClient(NodeSpec(NodeId("doomed"), address))
        agents = [*cluster.clients, victim]
        view = ClusterView.from_infos([await a.info() for a in agents])
        batcher = Batcher(lambda: (agents, view))
        stop.set()
        await doomed
        request = GenerationRequest(RequestId("r"), tuple(range(1, 20)), SamplingParams(max_tokens=4, temperature=0))
        with pytest.raises(AgentFailed, match="doomed"):
            async for _ in batcher.generate(request):
                pass
        await batcher.aclose()
        await victim.close()


async def test_a_bad_expert_batch_is_refused_with_invalid_argument(qwen_tiny: Path) -> None:
    """A peer's batch naming an expert the model lacks (or a layer without routed experts) is
    refused with a clear status, not an internal error from deep in the expert store."""
    cfg = json.loads((qwen_tiny / "config.json").read_text())
    x, w = tensor_to_proto(torch.zeros(2, cfg["hidden_size"])), tensor_to_proto(torch.full((2, 2), 0.5))
    bad_expert = tensor_to_proto(torch.tensor([[0, 1], [cfg["num_experts"], 0]], dtype=torch.int32))
    bad_layer = tensor_to_proto(torch.tensor([[0, 1], [1, 0]], dtype=torch.int32))
    async with local_cluster(qwen_tiny, 1) as cluster:
        async with grpc.aio.insecure_channel(cluster.specs[0].address) as channel:
            stub = pb_grpc.NodeAgentStub(channel)
            for layer, ids, message in ((1, bad_expert, "expert ids must be in"),
                                        (cfg["num_hidden_layers"], bad_layer, "has no routed experts")):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.RunExperts(pb.ExpertBatch(request_id="r", layer=layer, hidden=x, expert_ids=ids, weights=w))
                assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert message in (failed.value.details() or "")
