"""Only the cluster talks to an agent: a hostile client on the LAN is refused at the TLS handshake
(no certificate, or one from another CA), an enrolled agent cannot pose as the server, and a
channel reaches only the agent it names, whatever address it is given."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import grpc
import pytest

from protos.limits import CHANNEL_OPTIONS
from protos.potluck.v1 import agent_pb2 as pb
from protos.potluck.v1 import agent_pb2_grpc as pb_grpc
from protos.security import SERVER_IDENTITY, agent_identity
from scheduler.errors import AgentFailed
from scheduler.types import NodeId, NodeSpec
from server.certs import ClusterCA
from tests.integration.cluster import local_cluster


async def _info(channel: grpc.aio.Channel) -> pb.InfoReply:
    async with channel:
        return await pb_grpc.NodeAgentStub(channel).Info(pb.InfoRequest(), timeout=10)


async def test_an_agent_refuses_whoever_has_no_certificate_of_its_ca(qwen_tiny: Path) -> None:
    foreign = ClusterCA.create(days=1).issue(SERVER_IDENTITY, days=1)  # the right name, another CA
    async with local_cluster(qwen_tiny, 1) as cluster:
        spec = cluster.specs[0]
        assert (await _info(cluster.enrolment.channel(spec))).name == spec.name  # the server is served
        plaintext = grpc.aio.insecure_channel(spec.address, options=CHANNEL_OPTIONS)
        no_cert = grpc.aio.secure_channel(spec.address, grpc.ssl_channel_credentials(cluster.enrolment.server.ca),
                                          options=[("grpc.ssl_target_name_override", agent_identity(spec.name))])
        for channel in (plaintext, no_cert, cluster.enrolment.channel(spec, foreign)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _info(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # no call got through


async def test_an_enrolled_agent_cannot_make_control_calls(qwen_tiny: Path) -> None:
    """A peer's certificate opens the agent-to-agent calls only: posing as the server, an agent
    (say, a compromised laptop) is refused before its request is read."""
    async with local_cluster(qwen_tiny, 2) as cluster:
        peer = cluster.enrolment.ca.issue(agent_identity("agent1"), days=1)
        target = cluster.specs[0]
        calls = [("Info", pb.InfoRequest()), ("BeginStep", pb.BeginStepRequest(request_id="x", token_ids=[1] * 1000)),
                 ("Fill", pb.FillRequest()), ("SetPlacement", pb.PlacementRequest(experts=[0, 1])),
                 ("Release", pb.ReleaseRequest(request_id="x"))]
        async with cluster.enrolment.channel(target, peer) as channel:
            stub = pb_grpc.NodeAgentStub(channel)
            for method, request in calls:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await getattr(stub, method)(request, timeout=10)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
                assert "served only to the cluster's server" in (refused.value.details() or "")
            # A peer call is open to it: refused for its content, not for who sent it.
            with pytest.raises(grpc.aio.AioRpcError) as answered:
                await stub.FetchKV(pb.FetchKVRequest(request_id="nobody", layer=0), timeout=10)
            assert answered.value.code() != grpc.StatusCode.PERMISSION_DENIED


async def test_a_channel_reaches_only_the_agent_it_names(qwen_tiny: Path) -> None:
    """An inventory that gives agent0 the address of agent1 fails at the handshake, naming the
    agent the server meant to reach, instead of driving the wrong agent."""
    async with local_cluster(qwen_tiny, 2) as cluster:
        wrong = cluster.enrolment.client(NodeSpec(NodeId("agent0"), cluster.specs[1].address))
        try:
            with pytest.raises(AgentFailed, match="agent agent0"):
                await wrong.info()
        finally:
            await wrong.close()


async def test_the_data_plane_refuses_plaintext_and_strangers(qwen_tiny: Path) -> None:
    """The decode data plane (plain TCP between agents) is TLS with the same CA: a stranger's
    handshake fails, and a plaintext frame gets no answer (the connection closes)."""
    async with local_cluster(qwen_tiny, 1) as cluster:
        info = await cluster.clients[0].info()
        host, port = "127.0.0.1", info.data_port
        stranger = ClusterCA.create(days=1).issue(agent_identity("agent0"), days=1)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            reader, writer = await asyncio.open_connection(host, port, ssl=stranger.ssl_context(server_side=False))
            writer.write(b"\0\0\0\0")
            await reader.readexactly(1)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"\x05\0\0\0hello")
        try:
            answer = await asyncio.wait_for(reader.read(100), 10)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # closed, nothing answered
        writer.close()
