"""gRPC transport from this agent to its peers, through the emulated link.

Every tensor byte this agent sends or receives passes its link's bandwidth throttle, and every
message it sends arrives its link latency later. A request to a peer awaits `Link.request`; a
reply this agent sends gets its bandwidth from the handler (`Link.send`) and its latency from
the server's `LatencyInterceptor`, so each message is delayed once.
"""

from __future__ import annotations

import asyncio

import grpc
import torch

from node_agent.state import KVShard
from node_agent.throttle import Throttle
from protos.convert import kv_block_from_proto, tensor_from_proto, tensor_to_proto
from protos.limits import CHANNEL_OPTIONS, CHUNK_BYTES
from protos.potluck.v1 import agent_pb2 as pb
from protos.potluck.v1 import agent_pb2_grpc as pb_grpc



class Link:
    """This agent's emulated network link: paces and counts every tensor byte it sends and
    receives, and delays every message it sends.

    Full duplex: sending and receiving each have their own queue at the same rate, so sending
    does not slow receiving. A received message is booked on the downlink as having begun
    arriving while the sender paced it out (`receive`), so one message between two agents of
    rate R takes n/R, and messages converging on one receiver queue on its downlink. The latency
    is a delay, not a queue: messages sent together are paced one after another, then each
    arrives `latency_s` after its bytes.
    """

    def __init__(self, rate_bytes_per_s: float, latency_s: float = 0.0) -> None:
        if latency_s < 0:
            raise ValueError(f"link latency must be >= 0 seconds, got {latency_s}")
        self.throttle = Throttle(rate_bytes_per_s)  # send direction
        self.receive_throttle = Throttle(rate_bytes_per_s)
        self.latency_s = latency_s  # one-way delay of every message this agent sends, seconds
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send(self, *tensors: pb.Tensor) -> None:
        """Pace a message's tensor bytes through the send queue (bandwidth only, no latency)."""
        n = sum(len(t.data) for t in tensors)
        await self.throttle.pace_async(n)
        self.bytes_sent += n

    async def delay(self) -> None:
        """Wait out the latency of one message this agent sends."""
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)

    async def request(self, *tensors: pb.Tensor) -> None:
        """Await before each call to a peer: the request's bytes pass the link, then its latency."""
        await self.send(*tensors)
        await self.delay()

    async def receive(self, *tensors: pb.Tensor) -> None:
        """Pace the tensor bytes of a message this agent received through the receive queue.
        A link is a pipe, not store-and-forward: the bytes were arriving while the sender paced
        them out, so the receive queue books them as begun one transfer time (at this link's
        rate) ago. A lone message between agents of one rate then costs n/R, not 2n/R, and
        messages converging on one receiver queue behind each other on its downlink."""
        n = sum(len(t.data) for t in tensors)
        rate = self.receive_throttle.rate
        await self.receive_throttle.pace_async(n, ago_s=n / rate if rate > 0 else 0.0)
        self.bytes_received += n


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
            await self.link.request(block.keys, block.values)
            await self._stub(address).PushKV(block)

        await asyncio.gather(*(push(i, rows) for i, rows in enumerate(chunks)))

    async def attend(self, address: str, request_id: str, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        msg = pb.AttendRequest(request_id=request_id, layer=layer, queries=tensor_to_proto(q))
        await self.link.request(msg.queries)
        reply = await self._stub(address).Attend(msg)
        await self.link.receive(reply.output, reply.lse)
        return tensor_from_proto(reply.output), tensor_from_proto(reply.lse)

    async def run_experts(
        self, address: str, request_id: str, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
        decode: bool = False,
    ) -> torch.Tensor:
        async def run(rows: slice) -> torch.Tensor:
            batch = pb.ExpertBatch(
                request_id=request_id, layer=layer, hidden=tensor_to_proto(x[rows]),
                expert_ids=tensor_to_proto(ids[rows].to(torch.int32)), weights=tensor_to_proto(weights[rows].float()),
                decode=decode,
            )
            await self.link.request(batch.hidden, batch.expert_ids, batch.weights)
            result = await self._stub(address).RunExperts(batch)
            await self.link.receive(result.output)
            return tensor_from_proto(result.output)

        row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 1
        chunks = row_chunks(x.shape[0], row_bytes)
        if len(chunks) == 1:  # every decode call: no gather around one call
            return await run(chunks[0])
        return torch.cat(await asyncio.gather(*(run(rows) for rows in chunks)))

    async def fetch_kv(self, address: str, request_id: str, layer: int) -> KVShard:
        """A peer's K/V rows of one layer of a request (decode's home pulls the prompt's K/V):
        the first chunk says how many there are, the rest come in parallel."""
        async def fetch(chunk: int) -> pb.KVBlock:
            msg = pb.FetchKVRequest(request_id=request_id, layer=layer, chunk=chunk)
            await self.link.request()
            block = await self._stub(address).FetchKV(msg)
            await self.link.receive(block.keys, block.values)
            return block

        first = await fetch(0)
        blocks = [first, *await asyncio.gather(*(fetch(i) for i in range(1, first.num_chunks)))]
        parts = [kv_block_from_proto(b) for b in blocks]
        if len(parts) == 1:
            return KVShard(*parts[0])
        return KVShard(*(torch.cat([p[i] for p in parts]) for i in range(3)))
