"""Real agents with an emulated link latency: every reply and peer message arrives that much
later, health checks do not, and the logits stay the same."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.cluster import local_cluster

LATENCY_S = 0.2
ATOL = 1e-5  # the same computation, only later


async def test_link_latency_delays_replies_but_not_health_checks_and_keeps_logits(qwen_tiny: Path) -> None:
    ids = torch.randint(0, 1024, (21,), generator=torch.Generator().manual_seed(5)).tolist()
    async with local_cluster(qwen_tiny, 2) as cluster:
        expected = await cluster.runner().prefill_logits("fast", ids)
    async with local_cluster(qwen_tiny, 2, link_latency_s=LATENCY_S) as cluster:
        client = cluster.clients[0]
        start = time.monotonic()
        info = await client.info()
        assert time.monotonic() - start >= LATENCY_S
        assert info.link_latency_s == LATENCY_S

        async with cluster.enrolment.channel(cluster.specs[0]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            checks = []
            for _ in range(3):  # the fastest of three: a busy host may stall any one call
                start = time.monotonic()
                await health.Check(health_pb2.HealthCheckRequest(service="potluck.v1.NodeAgent"))
                checks.append(time.monotonic() - start)
            assert min(checks) < LATENCY_S

        start = time.monotonic()
        logits = await cluster.runner().prefill_logits("slow", ids)
        # At least BeginStep's reply, then Finish's: two replies one after the other.
        assert time.monotonic() - start >= 2 * LATENCY_S
        assert (logits - expected).abs().max().item() <= ATOL
