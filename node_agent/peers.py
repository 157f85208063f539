"""gRPC transport from this agent to its peers. Every tensor byte sent passes the link throttle."""

from __future__ import annotations

import asyncio

import grpc
import torch

from node_agent.state import KVShard
from node_agent.throttle import Throttle
from protos.convert import tensor_from_proto, tensor_to_proto
from protos.limits import CHANNEL_OPTIONS, CHUNK_BYTES
from protos.potluck.v1 import agent_pb2 as pb
from protos.potluck.v1 import agent_pb2_grpc as pb_grpc



class Link:
    """This agent's outgoing bandwidth: paces and counts every tensor byte it sends."""

    def __init__(self, rate_bytes_per_s: float) -> None:
        self.throttle = Throttle(rate_bytes_per_s)
        self.bytes_sent = 0

    async def send(self, *tensors: pb.Tensor) -> None:
        n = sum(len(t.data) for t in tensors)
        await self.throttle.pace_async(n)
        self.bytes_sent += n


def row_chunks(rows: int, row_bytes: int) -> list[slice]:
    per = max(1, CHUNK_BYTES // max(1, row_bytes))
    return [slice(i, min(rows, i + per)) for i in range(0, max(rows, 1), per)]


class GrpcPeers:
    def __init__(self, name: str, link: Link) -> None:
        self.name = name
        self.link = link
        self._stubs: dict[str, pb_grpc.NodeAgentStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def _stub(self, address: str) -> pb_grpc.NodeAgentStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels.append(channel)
            stub = self._stubs[address] = pb_grpc.NodeAgentStub(channel)
        return stub

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def push_kv(self, address: str, request_id: str, step: int, layer: int, shard: KVShard) -> None:
        row_bytes = 2 * shard.k[0].numel() * shard.k.element_size()
        chunks = row_chunks(shard.k.shape[0], row_bytes)

        async def push(i: int, rows: slice) -> None:
            block = pb.KVBlock(
                request_id=request_id, step=step, layer=layer, sender=self.name,
                keys=tensor_to_proto(shard.k[rows]), values=tensor_to_proto(shard.v[rows]),
                positions=shard.pos[rows].tolist(), chunk=i, num_chunks=len(chunks),
            )
            await self.link.send(block.keys, block.values)
            await self._stub(address).PushKV(block)

        await asyncio.gather(*(push(i, rows) for i, rows in enumerate(chunks)))

    async def attend(self, address: str, request_id: str, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        msg = pb.AttendRequest(request_id=request_id, layer=layer, queries=tensor_to_proto(q))
        await self.link.send(msg.queries)
        reply = await self._stub(address).Attend(msg)
        return tensor_from_proto(reply.output), tensor_from_proto(reply.lse)

    async def run_experts(
        self, address: str, request_id: str, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        async def run(rows: slice) -> torch.Tensor:
            batch = pb.ExpertBatch(
                request_id=request_id, layer=layer, hidden=tensor_to_proto(x[rows]),
                expert_ids=tensor_to_proto(ids[rows].to(torch.int32)), weights=tensor_to_proto(weights[rows].float()),
            )
            await self.link.send(batch.hidden, batch.expert_ids, batch.weights)
            return tensor_from_proto((await self._stub(address).RunExperts(batch)).output)

        row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 1
        parts = await asyncio.gather(*(run(rows) for rows in row_chunks(x.shape[0], row_bytes)))
        return torch.cat(parts) if len(parts) > 1 else parts[0]
