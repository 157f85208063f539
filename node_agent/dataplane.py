"""The decode data plane: a home agent's expert calls to holders on persistent TCP connections.

A decode step calls each layer's remote holders once per token; a unary gRPC call costs about
0.5 ms of Python on each side (standalone, one token: RunExperts 1.9 ms against 0.6 ms for Info),
which on an emulated 1 Gbit/s, 1 ms LAN was most of a token's time beyond its round trips. Here
each pair of agents keeps one connection; a frame is a little-endian uint32 length and a
`PeerFrame` (protos/: the same `ExpertBatch` and `ExpertResult` as the gRPC call), and replies
find their caller by call id, so calls overlap on one connection.

    server = DataServer(name, run, link); port = await server.start(host)
    client = DataClient(link, timeout_s); out = await client.run_experts(holder, address, layer, x, ids, w)

With credentials, both ends speak TLS with certificates from the cluster's CA: the server serves
only enrolled agents, and the client checks that the holder's certificate names the holder it
meant to call. While calls wait, the caller pings the holder every 2 s and gives up on the connection when 5 s
pass with nothing from it (a stopped holder keeps its socket open): its calls then fail at once,
naming the holder, as gRPC's keepalives fail calls to a stopped agent. Every byte passes the agent's link emulation as on the gRPC path (bandwidth both ways, latency on
every frame sent). Errors come back as error frames naming the holder; a broken connection fails
every call waiting on it, and the next call reconnects. A failed call raises `PeerFailed` naming
the holder, as a failed gRPC call to a peer does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch

from node_agent.peers import Link, PeerFailed
from protos.convert import (PING, PONG, expert_batch_to_proto, expert_result_from_proto, peer_frame_from_proto,
                            peer_frame_to_proto)
from protos.limits import KEEPALIVE_TIME_MS, MAX_MESSAGE_BYTES
from protos.ids import SliceId
from protos.messages import ExpertBatch
from protos.potluck.v1 import agent_pb2 as pb
from protos.security import Credentials, agent_identity, agent_name, ssl_identity

log = logging.getLogger(__name__)
_LENGTH = struct.Struct("<I")
KEEPALIVE_TIMEOUT_S = 5.0  # silence from a holder with calls waiting that closes the connection

RunBatch = Callable[[pb.ExpertBatch], Awaitable[pb.ExpertResult]]  # the holder's RunExperts work


class DataPlaneError(RuntimeError):
    """An expert call on the data plane failed: the holder's error, or a lost connection (the
    caller hears it as PeerFailed)."""

    def __init__(self, message: str, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered  # the holder answered with an error (it is up); else it is unreachable


async def _read_frame(reader: asyncio.StreamReader) -> pb.PeerFrame:
    (n,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if n > MAX_MESSAGE_BYTES:
        raise DataPlaneError(f"a frame of {n} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    return pb.PeerFrame.FromString(await reader.readexactly(n))


def _write_frame(writer: asyncio.StreamWriter, frame: pb.PeerFrame) -> None:
    body = frame.SerializeToString()
    writer.write(_LENGTH.pack(len(body)) + body)


class DataServer:
    """Serves expert calls from home agents: each frame is run as it arrives (calls overlap)."""

    def __init__(self, name: str, run: RunBatch, link: Link, creds: Credentials | None = None) -> None:
        self.name, self.run, self.link = name, run, link
        self._ssl = creds.ssl_context(server_side=True) if creds is not None else None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()  # open connections, closed with the server
        self._serving: set[asyncio.Task[None]] = set()  # one per connection (asyncio's own tasks)

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on `port` of `host` (0: an ephemeral one); returns the port."""
        self._server = await asyncio.start_server(self._serve, host, port, ssl=self._ssl)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()  # callers waiting on this agent hear at once, not at their deadline
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Each connection's task ends on its closed socket. Left running, it would be cancelled
        # when the loop shuts down, and asyncio's stream callback logs a cancelled connection
        # task as an error with a traceback, once per connection.
        if self._serving:
            await asyncio.wait(self._serving, timeout=1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._ssl is not None:
            who = ssl_identity(writer.get_extra_info("peercert"))
            if who is None or agent_name(who) is None:  # the handshake checked the CA; only agents call here
                log.warning("data plane: refused a connection from %s (certificate names %s, not an agent)",
                            writer.get_extra_info("peername"), who)
                writer.close()
                return
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)
        try:
            while True:
                frame = await _read_frame(reader)
                if frame.ping:  # not the emulated traffic: no link latency
                    _write_frame(writer, PONG)
                    continue
                task = asyncio.ensure_future(self._answer(frame, writer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the caller went away
        except DataPlaneError as exc:
            log.warning("data plane: dropped a connection: %s", exc)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, frame: pb.PeerFrame, writer: asyncio.StreamWriter) -> None:
        try:
            call, batch = peer_frame_from_proto(frame)
            if not isinstance(batch, pb.ExpertBatch):
                raise ValueError("a data plane request must carry an expert batch")
            result = await self.run(batch)
            reply = peer_frame_to_proto(call, result)
            await self.link.send(result.output)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the caller hears of it, with this agent's name
            reply = peer_frame_to_proto(frame.call, f"agent {self.name}: {type(exc).__name__}: {exc}")
        await self.link.delay()
        if not writer.is_closing():
            _write_frame(writer, reply)


@dataclass
class _Connection:
    writer: asyncio.StreamWriter
    pending: dict[int, asyncio.Future[pb.ExpertResult]] = field(default_factory=dict)
    reading: asyncio.Task[None] | None = None
    pinging: asyncio.Task[None] | None = None
    heard: float = field(default_factory=time.monotonic)  # when the last frame came from the holder
    failure: DataPlaneError | None = None  # why it was closed from this end


class DataClient:
    """A home agent's calls to holders, one connection per holder address."""

    def __init__(self, link: Link, timeout_s: float = 120.0, creds: Credentials | None = None) -> None:
        self.link = link
        self.timeout_s = timeout_s  # deadline of one call
        self._ssl = creds.ssl_context(server_side=False) if creds is not None else None
        self._connections: dict[tuple[str, str], _Connection] = {}  # by (holder, address): checked for that holder
        self._connecting: dict[tuple[str, str], asyncio.Lock] = {}
        self._calls = itertools.count(1)

    async def _connection(self, holder: str, address: str) -> _Connection:
        key = (holder, address)
        conn = self._connections.get(key)
        if conn is not None and not conn.writer.is_closing():
            return conn
        async with self._connecting.setdefault(key, asyncio.Lock()):
            conn = self._connections.get(key)
            if conn is not None and not conn.writer.is_closing():
                return conn
            host, _, port = address.rpartition(":")
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host.strip("[]"), int(port), ssl=self._ssl), self.timeout_s)
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                raise DataPlaneError(f"cannot reach the data plane at {address}: {exc}") from exc
            if self._ssl is not None and (who := ssl_identity(writer.get_extra_info("peercert"))) != agent_identity(holder):
                writer.close()
                raise DataPlaneError(f"the data plane at {address} is {who}, not agent {holder}")
            conn = self._connections[key] = _Connection(writer)
            conn.reading = asyncio.ensure_future(self._read(address, reader, conn))
            conn.pinging = asyncio.ensure_future(self._keepalive(address, conn))
            return conn

    async def _keepalive(self, address: str, conn: _Connection) -> None:
        """Ping the holder while calls wait; close the connection after KEEPALIVE_TIMEOUT_S of
        silence (its calls fail, and the next call reconnects)."""
        while not conn.writer.is_closing():
            await asyncio.sleep(KEEPALIVE_TIME_MS / 1000)
            if not conn.pending:
                conn.heard = time.monotonic()  # idle: silence is expected
                continue
            if time.monotonic() - conn.heard > KEEPALIVE_TIMEOUT_S:
                conn.failure = DataPlaneError(f"{address} sent nothing for {KEEPALIVE_TIMEOUT_S:.0f} s with calls "
                                              f"waiting (stopped or unreachable)")
                conn.writer.close()
                if conn.reading is not None:
                    conn.reading.cancel()
                return
            _write_frame(conn.writer, PING)

    async def _read(self, address: str, reader: asyncio.StreamReader, conn: _Connection) -> None:
        error: BaseException = DataPlaneError(f"the data plane connection to {address} closed")
        try:
            while True:
                frame = await _read_frame(reader)
                conn.heard = time.monotonic()
                if frame.pong:
                    continue
                waiter = conn.pending.pop(frame.call, None)
                if waiter is None or waiter.done():
                    continue  # its caller gave up (timed out or was cancelled)
                try:
                    _, body = peer_frame_from_proto(frame)
                except ValueError:  # no body at all
                    body = ""
                if isinstance(body, pb.ExpertResult):
                    waiter.set_result(body)
                else:  # the holder's error (a batch is no answer)
                    why = body if isinstance(body, str) and body else "an empty reply"
                    waiter.set_exception(DataPlaneError(f"{address}: {why}", answered=True))
        except (asyncio.IncompleteReadError, ConnectionError, DataPlaneError) as exc:
            if isinstance(exc, DataPlaneError):
                error = exc
        except asyncio.CancelledError:
            if conn.failure is None:
                raise
        finally:
            error = conn.failure or error
            conn.writer.close()
            for waiter in conn.pending.values():
                if not waiter.done():
                    waiter.set_exception(error)
            conn.pending.clear()

    def run_experts(self, holder: str, address: str, layer: int, x: torch.Tensor, ids: torch.Tensor,
                    weights: torch.Tensor, part: int = 0, of: int = 1, read_ahead: Sequence[SliceId] = ()
                    ) -> Awaitable[torch.Tensor]:
        """The weighted experts [n, D] of `holder` (its data plane at `address`) on a decode step's
        rows x [n, D] (ids [n, k] with -1 in the slots it does not run); PeerFailed naming it. The
        call leaves now: its latency counts from here, though the awaitable runs later (a job on
        the event loop hands its experts over, then runs the local ones before it yields). With
        `of` >= 2, slice `part` of `of` of each expert (a partial sum), and `read_ahead` to begin
        reading after (`ExpertBatch.read_ahead`)."""
        return self._call(holder, address, ExpertBatch(request_id="decode", layer=layer, hidden=x, expert_ids=ids,
                                                       weights=weights, decode=True, part=part, of=of,
                                                       read_ahead=tuple(read_ahead)),
                          time.monotonic())

    async def _call(self, holder: str, address: str, message: ExpertBatch, left: float) -> torch.Tensor:
        batch = expert_batch_to_proto(message)
        try:
            conn = await self._connection(holder, address)
            call = next(self._calls)
            waiter: asyncio.Future[pb.ExpertResult] = asyncio.get_running_loop().create_future()
            conn.pending[call] = waiter
            try:
                await self.link.request(batch.hidden, batch.expert_ids, batch.weights, since=left)
                _write_frame(conn.writer, peer_frame_to_proto(call, batch))
                try:
                    result = await asyncio.wait_for(waiter, self.timeout_s)
                except TimeoutError:
                    raise DataPlaneError(f"{address} did not answer an expert call within {self.timeout_s}s") from None
            finally:
                conn.pending.pop(call, None)
        except DataPlaneError as exc:
            code = "INTERNAL" if exc.answered else "UNAVAILABLE"
            raise PeerFailed(holder, address, "RunExperts (data plane)", code, str(exc)) from exc
        await self.link.receive(result.output)
        return expert_result_from_proto(result)

    async def close(self) -> None:
        for conn in self._connections.values():
            conn.writer.close()
            for task in (conn.reading, conn.pinging):
                if task is not None:
                    task.cancel()
        await asyncio.gather(*(c.reading for c in self._connections.values() if c.reading), return_exceptions=True)
        self._connections.clear()
