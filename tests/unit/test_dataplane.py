"""The decode data plane carries expert calls both ways on one connection, names the holder in
its errors (PeerFailed, as a failed gRPC call to a peer), and fails every waiting call when a
connection drops (real sockets on loopback)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from node_agent.dataplane import DataClient, DataServer
from node_agent.peers import Link, PeerFailed
from protos.convert import tensor_from_proto, tensor_to_proto
from protos.potluck.v1 import agent_pb2 as pb


async def doubling(batch: pb.ExpertBatch) -> pb.ExpertResult:
    """Stands in for the holder's experts: 2 * x, after a delay that depends on the layer, so
    that replies overtake one another on the connection."""
    await asyncio.sleep(0.05 * (3 - batch.layer))
    if batch.layer == 9:
        raise ValueError("layer 9 has no routed experts")
    return pb.ExpertResult(output=tensor_to_proto(2 * tensor_from_proto(batch.hidden)))


async def test_overlapping_calls_on_one_connection_each_get_their_own_reply() -> None:
    server = DataServer("holder", doubling, Link(0))
    port = await server.start("127.0.0.1")
    client = DataClient(Link(0), timeout_s=10)
    try:
        xs = [torch.full((2, 4), float(i)) for i in range(3)]
        ids, w = torch.tensor([[0, -1], [1, 0]]), torch.full((2, 2), 0.5)
        address = f"127.0.0.1:{port}"
        outs = await asyncio.gather(*(client.run_experts("holder", address, i, x, ids, w) for i, x in enumerate(xs)))
        assert all(torch.equal(out, 2 * x) for out, x in zip(outs, xs))
        with pytest.raises(PeerFailed, match="agent holder: ValueError: layer 9 has no routed experts") as failed:
            await client.run_experts("holder", address, 9, xs[0], ids, w)
        assert failed.value.peer == "holder"
        assert torch.equal(await client.run_experts("holder", address, 2, xs[1], ids, w), 2 * xs[1])  # still usable
    finally:
        await client.close()
        await server.close()


async def test_a_lost_holder_fails_the_waiting_call_and_a_later_call_reconnects_or_fails_clearly() -> None:
    started = asyncio.Event()

    async def hanging(batch: pb.ExpertBatch) -> pb.ExpertResult:
        started.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    server = DataServer("slow", hanging, Link(0))
    port = await server.start("127.0.0.1")
    client = DataClient(Link(0), timeout_s=30)
    x, ids, w = torch.zeros(1, 4), torch.tensor([[0, 1]]), torch.full((1, 2), 0.5)
    call = asyncio.ensure_future(client.run_experts("slow", f"127.0.0.1:{port}", 0, x, ids, w))
    await started.wait()
    await server.close()  # the holder goes away with the call in flight
    with pytest.raises(PeerFailed, match=f"^agent slow \\(127.0.0.1:{port}\\) failed"):
        await call
    with pytest.raises(PeerFailed, match="cannot reach") as failed:
        await client.run_experts("slow", f"127.0.0.1:{port}", 0, x, ids, w)
    assert failed.value.peer == "slow"
    await client.close()


async def test_a_call_past_its_deadline_fails_naming_the_holder() -> None:
    async def never(batch: pb.ExpertBatch) -> pb.ExpertResult:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    server = DataServer("stuck", never, Link(0))
    port = await server.start("127.0.0.1")
    client = DataClient(Link(0), timeout_s=0.2)
    try:
        with pytest.raises(PeerFailed, match=f"127.0.0.1:{port} did not answer"):
            await client.run_experts("stuck", f"127.0.0.1:{port}", 0, torch.zeros(1, 4), torch.tensor([[0, 1]]),
                                     torch.ones(1, 2))
    finally:
        await client.close()
        await server.close()
