"""gRPC transport from this agent to its peers, through the emulated link.

Every tensor byte this agent sends or receives passes its link's bandwidth throttle, and every
message it sends arrives its link latency later. A request to a peer awaits `Link.request`; a
reply this agent sends gets its bandwidth from the handler (`Link.send`) and its latency from
the server's `LatencyInterceptor` (interceptors.py), so each message is delayed once.

A call to a peer that fails, or that cannot reach it, raises `PeerFailed` naming that peer, so
that the scheduler hears which agent failed, not only which one was waiting on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import grpc
import torch

from node_agent.precise_timer import sleep_precisely
from node_agent.state import KVShard
from node_agent.throttle import Throttle
from protos.convert import (attend_reply_from_proto, attend_to_proto, expert_batch_to_proto, expert_part_from_proto,
                            expert_result_from_proto, failed_agent_from_metadata, fetch_expert_to_proto,
                            fetch_kv_to_proto, kv_block_from_proto, kv_block_to_proto, tensor_nbytes)
from protos.ids import ExpertId, SliceId
from protos.limits import CHANNEL_OPTIONS, CHUNK_BYTES, peer_deadline_s
from protos.messages import ExpertBatch, KVBlock
from protos.potluck.v1 import agent_pb2 as pb
from protos.potluck.v1 import agent_pb2_grpc as pb_grpc
from protos.security import Credentials, agent_identity, open_channel


class PeerFailed(RuntimeError):
    """A call to another agent failed, or could not reach it: `peer` is the agent that failed."""

    def __init__(self, peer: str, address: str, method: str, code: str, details: str) -> None:
        super().__init__(f"agent {peer} ({address}) failed during {method}: {code}: {details}")
        self.peer = peer  # its name (NodeId)
        self.address = address  # where this agent reached it
        self.method = method  # the call, e.g. "PushKV"
        self.code = code  # what went wrong, as a gRPC status code name, e.g. "UNAVAILABLE"
        self.details = details


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

    async def send(self, *tensors: pb.Tensor, background: bool = False) -> None:
        """Pace a message's tensor bytes through the send queue (bandwidth only, no latency);
        background bytes (a bulk transfer) yield to the others (see throttle.py)."""
        n = sum(tensor_nbytes(t) for t in tensors)
        await self.throttle.pace_async(n, background=background)
        self.bytes_sent += n

    async def delay(self, since: float | None = None) -> None:
        """Wait out the latency of one message this agent sends (that left at monotonic time
        `since`, default now)."""
        if self.latency_s > 0:
            wait = self.latency_s if since is None else since + self.latency_s - time.monotonic()
            if wait > 0:
                await sleep_precisely(wait)  # asyncio's own timers came 15% late at 1 ms

    async def request(self, *tensors: pb.Tensor, since: float | None = None) -> None:
        """Await before each call to a peer: the request's bytes pass the link, then its latency
        (from `since`, the monotonic time the call left, default now)."""
        await self.send(*tensors)
        await self.delay(since)

    async def receive(self, *tensors: pb.Tensor, background: bool = False) -> None:
        """Pace the tensor bytes of a message this agent received through the receive queue.
        A link is a pipe, not store-and-forward: the bytes were arriving while the sender paced
        them out, so the receive queue books them as begun one transfer time (at this link's
        rate) ago. A lone message between agents of one rate then costs n/R, not 2n/R, and
        messages converging on one receiver queue behind each other on its downlink."""
        n = sum(tensor_nbytes(t) for t in tensors)
        rate = self.receive_throttle.rate
        await self.receive_throttle.pace_async(n, ago_s=n / rate if rate > 0 else 0.0, background=background)
        self.bytes_received += n


def row_chunks(rows: int, row_bytes: int) -> list[slice]:
    per = max(1, CHUNK_BYTES // max(1, row_bytes))
    return [slice(i, min(rows, i + per)) for i in range(0, max(rows, 1), per)]


class GrpcPeers:
    """Channels to the other agents. With credentials, a channel to agent `name` accepts only a
    server whose certificate names that agent: an address in a message reaches an enrolled peer
    of the inventory or fails at the handshake."""

    def __init__(self, name: str, link: Link, creds: Credentials | None = None) -> None:
        self.name = name
        self.link = link
        self.creds = creds
        self._stubs: dict[tuple[str, str], pb_grpc.NodeAgentStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def _stub(self, name: str, address: str) -> pb_grpc.NodeAgentStub:
        stub = self._stubs.get((name, address))
        if stub is None:
            channel = open_channel(address, agent_identity(name), self.creds, CHANNEL_OPTIONS)
            self._channels.append(channel)
            stub = self._stubs[name, address] = pb_grpc.NodeAgentStub(channel)
        return stub

    async def _call(self, name: str, address: str, method: str, request: Any, timeout_s: float) -> Any:
        """The peer's reply within `timeout_s` (peer_deadline_s); PeerFailed naming it, or the
        agent it names as failed, if the call fails."""
        try:
            return await getattr(self._stub(name, address), method)(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            name, address = failed_agent_from_metadata(exc.trailing_metadata()) or (name, address)
            raise PeerFailed(name, address, method, exc.code().name, exc.details() or "") from exc

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def push_kv(self, name: str, address: str, request_id: str, step: int, layer: int, shard: KVShard) -> None:
        row_bytes = 2 * shard.k[0].numel() * shard.k.element_size()
        chunks = row_chunks(shard.k.shape[0], row_bytes)

        async def push(i: int, rows: slice) -> None:
            block = kv_block_to_proto(KVBlock(
                request_id=request_id, step=step, layer=layer, sender=self.name, keys=shard.k[rows],
                values=shard.v[rows], positions=shard.pos[rows], chunk=i, num_chunks=len(chunks)))
            await self.link.request(block.keys, block.values)
            await self._call(name, address, "PushKV", block, peer_deadline_s(2 * tensor_nbytes(block.keys)))

        await asyncio.gather(*(push(i, rows) for i, rows in enumerate(chunks)))

    async def attend(self, name: str, address: str, request_id: str, layer: int, q: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        msg = attend_to_proto(request_id, layer, q)
        await self.link.request(msg.queries)
        reply = await self._call(name, address, "Attend", msg, peer_deadline_s(2 * tensor_nbytes(msg.queries)))
        await self.link.receive(reply.output, reply.lse)
        return attend_reply_from_proto(reply)

    async def run_experts(
        self, name: str, address: str, request_id: str, layer: int, x: torch.Tensor, ids: torch.Tensor,
        weights: torch.Tensor, decode: bool = False, part: int = 0, of: int = 1, read_ahead: Sequence[SliceId] = (),
    ) -> torch.Tensor:
        async def run(rows: slice) -> torch.Tensor:
            batch = expert_batch_to_proto(ExpertBatch(request_id=request_id, layer=layer, hidden=x[rows],
                                                      expert_ids=ids[rows], weights=weights[rows], decode=decode,
                                                      part=part, of=of, read_ahead=tuple(read_ahead)))
            await self.link.request(batch.hidden, batch.expert_ids, batch.weights)
            # The holder may have to read each expert from its disk first: 30 s an expert allows a
            # Mixtral expert (352 MB in bfloat16) from a slow USB disk.
            experts = int(ids[rows].unique().numel())
            result = await self._call(name, address, "RunExperts", batch,
                                      peer_deadline_s(2 * tensor_nbytes(batch.hidden), work_s=30.0 * experts))
            await self.link.receive(result.output)
            return expert_result_from_proto(result)

        row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 1
        chunks = row_chunks(x.shape[0], row_bytes)
        if len(chunks) == 1:  # every decode call: no gather around one call
            return await run(chunks[0])
        return torch.cat(await asyncio.gather(*(run(rows) for rows in chunks)))

    async def fetch_expert(self, name: str, address: str, eid: ExpertId
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A peer's resident expert (gate [I, D], up [I, D], down [D, I]), for a placement: the
        first chunk says how many there are, the rest come in parallel; background traffic."""
        async def fetch(chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
            await self.link.request()
            part: pb.ExpertPart = await self._call(name, address, "FetchExpert",
                                                   fetch_expert_to_proto(eid.layer, eid.index, chunk),
                                                   peer_deadline_s(CHUNK_BYTES))
            await self.link.receive(part.gate, part.up, part.down, background=True)
            return expert_part_from_proto(part)

        first = await fetch(0)
        parts = [first, *await asyncio.gather(*(fetch(i) for i in range(1, first[4])))]
        if len(parts) == 1:
            return first[0], first[1], first[2]
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                torch.cat([p[2] for p in parts], dim=1))

    async def fetch_kv(self, name: str, address: str, request_id: str, layer: int) -> KVShard:
        """A peer's K/V rows of one layer of a request (decode's home pulls the prompt's K/V):
        the first chunk says how many there are, the rest come in parallel."""
        async def fetch(chunk: int) -> pb.KVBlock:
            await self.link.request()
            block: pb.KVBlock = await self._call(name, address, "FetchKV", fetch_kv_to_proto(request_id, layer, chunk),
                                                 peer_deadline_s(CHUNK_BYTES))
            await self.link.receive(block.keys, block.values, background=True)  # the move yields to decode traffic
            return block

        first = await fetch(0)
        blocks = [first, *await asyncio.gather(*(fetch(i) for i in range(1, first.num_chunks)))]
        parts = [kv_block_from_proto(b) for b in blocks]
        if len(parts) == 1:
            return KVShard(parts[0].keys, parts[0].values, parts[0].positions)
        return KVShard(torch.cat([p.keys for p in parts]), torch.cat([p.values for p in parts]),
                       torch.cat([p.positions for p in parts]))
