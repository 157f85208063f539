"""The agent process: settings, the gRPC servicer (thin: parse, delegate, convert), health, signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from node_agent.compute_profile import measure_expert_flops, set_thread_torch_threads
from node_agent.dataplane import DataClient, DataServer
from node_agent.cache_policy import LayerCyclicPolicy, LRUPolicy
from node_agent.dispatch import LayerPlan
from node_agent.expert_buffer import BufferTooSmall, ExpertBuffer, Key
from node_agent.expert_store import ExpertStore
from node_agent.interceptors import ErrorInterceptor, GateInterceptor, LatencyInterceptor
from node_agent.limits import AgentLimits, check_at_most, control_message_bytes
from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig
from node_agent.model.moe import load_dense
from node_agent.peers import GrpcPeers, Link
from node_agent.state import KVShard
from node_agent.throttle import ComputePacer, Throttle
from node_agent.worker import AgentCore
from protos.convert import (adopt_kv_from_proto, adopt_kv_reply_to_proto, attend_from_proto, attend_reply_to_proto,
                            begin_step_from_proto, cache_state_to_proto, decode_step_from_proto,
                            decode_step_reply_to_proto, expert_batch_from_proto, expert_from_wire,
                            expert_part_to_proto, expert_result_to_proto, expert_to_wire, fetch_expert_from_proto,
                            fetch_kv_from_proto,
                            fill_from_proto, fill_reply_to_proto, finish_from_proto, finish_reply_to_proto,
                            forward_from_proto, info_to_proto, kv_block_from_proto, kv_block_to_proto,
                            layer_report_to_proto, placement_from_proto, placement_reply_to_proto, release_from_proto,
                            routing_table_from_proto, step_begun_to_proto, tensor_nbytes)
from protos.human import format_rate, format_size
from protos.limits import SERVER_OPTIONS
from protos.messages import AgentInfo, CacheCounters, CacheState, KVBlock, StepBegun
from protos.potluck.v1 import agent_pb2 as pb
from protos.potluck.v1 import agent_pb2_grpc as pb_grpc
from protos.ids import ExpertId, NodeId, model_fingerprint
from protos.security import Credentials, CredentialsError, agent_identity

log = logging.getLogger("potluck.agent")


class AgentSettings(BaseSettings):
    """One node agent. Environment variables POTLUCK_AGENT_<FIELD> override defaults."""

    model_config = SettingsConfigDict(env_prefix="POTLUCK_AGENT_", frozen=True)

    listen: str = Field(description="host:port of the gRPC server")
    model_dir: Path = Field(description="checkpoint folder on this device's disk")
    name: str | None = Field(None, description="node name; defaults to the listen address")
    expert_memory_bytes: int = Field(0, ge=0, description="expert buffer budget in bytes; 0 = unlimited")
    disk_bytes_per_s: float = Field(0, ge=0, description="expert store read rate; 0 = unlimited")
    link_bytes_per_s: float = Field(0, ge=0, description="send rate to peers and scheduler, and receive rate "
                                    "(each direction its own); 0 = unlimited")
    link_latency_s: float = Field(0, ge=0, description="one-way delay of every message the agent sends, seconds; "
                                  "0 = none")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads for this agent")
    compute_share: float = Field(0, ge=0, le=1, description="emulated compute speed as a fraction of one host "
                                 "core (benchmarks); 0 = not paced")
    dtype: str = Field("float32", description="compute dtype: float32 | bfloat16 | float16")
    eviction: str = Field("layer-cyclic", pattern="^(lru|layer-cyclic)$",
                          description="which expert to evict: lru, or layer-cyclic (the one needed last)")
    log_level: str = Field("INFO")
    data_port: int = Field(0, ge=0, le=65535, description="TCP port of the decode data plane; 0 = any free port")
    certs: Path | None = Field(None, description="folder of this node's ca.pem, cert.pem, key.pem (`potluck certs`)")
    insecure: bool = Field(False, description="plaintext gRPC and data plane, anyone may call (trusted networks only)")
    max_step_tokens: int = Field(AgentLimits.max_step_tokens, ge=1, description="new tokens of one request in one step")
    max_requests: int = Field(AgentLimits.max_requests, ge=1, description="requests with state on this agent")
    max_inbox_bytes: int = Field(AgentLimits.max_inbox_bytes, ge=1, description="K/V bytes from peers not yet used")
    request_ttl_s: float = Field(AgentLimits.request_ttl_s, gt=0, description="seconds before an untouched request's "
                                 "state is released")

    @model_validator(mode="after")
    def _paced_on_one_thread(self) -> AgentSettings:
        # The pacer counts the compute thread's CPU time; work on other torch threads would escape it.
        if self.compute_share and self.torch_threads != 1:
            raise ValueError("compute_share paces one compute thread: torch_threads must be 1")
        return self

    @model_validator(mode="after")
    def _secure_unless_told(self) -> AgentSettings:
        if (self.certs is None) == (not self.insecure):
            raise ValueError("an agent needs exactly one of certs (its certificate folder) and insecure (plaintext)")
        return self

    def credentials(self) -> Credentials | None:
        """This node's TLS material (None: insecure); CredentialsError if the folder cannot serve
        this node (missing files, or a certificate that names another node)."""
        if self.certs is None:
            return None
        creds = Credentials.load(self.certs)
        if creds.identity != agent_identity(self.node_name):
            raise CredentialsError(f"{self.certs / 'cert.pem'} is the certificate of {creds.identity}, not of node "
                                   f"{self.node_name!r} ({agent_identity(self.node_name)}): give this node's folder")
        return creds

    @property
    def node_name(self) -> str:
        return self.name or self.listen

    @property
    def limits(self) -> AgentLimits:
        return AgentLimits(max_step_tokens=self.max_step_tokens, max_requests=self.max_requests,
                           max_inbox_bytes=self.max_inbox_bytes, request_ttl_s=self.request_ttl_s)


def split_host(listen: str) -> str:
    """The host part of a host:port listen address ("[::1]:50051" -> "::1")."""
    host = listen.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


class Servicer(pb_grpc.NodeAgentServicer):
    """Each handler parses its request (protos/convert.py), delegates to the core and converts the
    answer; the core holds no gRPC."""

    def __init__(self, core: AgentCore, settings: AgentSettings, link: Link, store: ExpertStore, fingerprint: str,
                 flops: float, data_port: int = 0) -> None:
        self.core, self.settings, self.link, self.store, self.fingerprint = core, settings, link, store, fingerprint
        self.flops = flops
        self.data_port = data_port  # TCP port of the decode data plane (0: none)

    async def Info(self, request: pb.InfoRequest, context: Any) -> pb.InfoReply:
        cfg, s = self.core.cfg, self.settings
        return info_to_proto(AgentInfo(
            name=NodeId(s.node_name), model_type=cfg.model_type, num_layers=cfg.num_layers,
            num_experts=cfg.num_experts, vocab_size=cfg.vocab_size, fingerprint=self.fingerprint,
            expert_bytes=self.store.expert_nbytes, memory_bytes=s.expert_memory_bytes,
            disk_bytes_per_s=s.disk_bytes_per_s, link_bytes_per_s=s.link_bytes_per_s,
            max_positions=cfg.max_positions, dense_layers=frozenset(cfg.dense_layers), flops_per_s=self.flops,
            hidden_size=cfg.hidden_size, dtype_bytes=self.core.dense.embed.element_size(),
            link_latency_s=s.link_latency_s, data_port=self.data_port, compute_share=s.compute_share))

    async def BeginStep(self, request: pb.BeginStepRequest, context: Any) -> pb.BeginStepReply:
        # Before converting: a million ids would take 36 MB of Python ints only to be refused.
        check_at_most("tokens in one step", len(request.token_ids), self.core.limits.max_step_tokens)
        b = begin_step_from_proto(request)
        report = await self.core.begin_step(b.request_id, b.step, b.token_ids, b.positions, b.peers, b.all_logits,
                                            b.predict)
        buf = self.core.buffer
        held = self._flat(buf.all_resident() + buf.all_loading()) if b.holdings else frozenset()
        return step_begun_to_proto(StepBegun(report, held))

    async def Forward(self, request: pb.ForwardRequest, context: Any) -> pb.ForwardReply:
        f = forward_from_proto(request)
        report = await self.core.forward(f.request_id, f.layer, LayerPlan.of(f.plan, self.core.name), f.prefetch,
                                         f.predict, f.direct)
        return layer_report_to_proto(report)

    async def Finish(self, request: pb.FinishRequest, context: Any) -> pb.FinishReply:
        request_id, plan = finish_from_proto(request)
        logits, positions = await self.core.finish(request_id, LayerPlan.of(plan, self.core.name))
        reply = finish_reply_to_proto(logits, positions.tolist())
        if logits is not None:
            await self.link.send(reply.logits)
        return reply

    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseReply:
        await self.core.release(release_from_proto(request))
        return pb.ReleaseReply()

    async def CacheState(self, request: pb.CacheStateRequest, context: Any) -> pb.CacheStateReply:
        buf = self.core.buffer
        E = self.core.cfg.num_experts
        slices = frozenset((expert_to_wire(s.expert, E), s.part, s.of) for s in buf.resident_slices())
        return cache_state_to_proto(CacheState(self._counters(), self._flat(buf.all_resident()),
                                               self._flat(buf.all_loading()), self._flat(buf.placed), slices,
                                               self.store.expert_read_s(), self.core.decoder.round_trip_s))

    def _counters(self) -> CacheCounters:
        core, buf, c = self.core, self.core.buffer, self.core.buffer.counters
        return CacheCounters(
            hits=c.hits, misses=c.misses, loads=c.loads, evictions=c.evictions, bytes_read=self.store.bytes_read,
            bytes_sent=self.link.bytes_sent, bytes_used=buf.bytes_used, capacity_bytes=buf.capacity,
            attention_s=core.attention_s, prefetches=c.prefetches, predicted_used=core.recall.predicted_used,
            used=core.recall.used, predicted_pairs_used=core.recall.predicted_pairs_used,
            pairs_used=core.recall.pairs_used,
            compute_overrun_s=core.pacer.overrun_s, early_used=core.early_used, early_dropped=core.early_dropped,
            fills=c.fills, fill_preemptions=c.fill_preemptions, direct_sent=core.direct_sent,
            decode_steps=core.decoder.steps, decode_tokens=core.decoder.tokens,
            decode_round_trips=core.decoder.round_trips, decode_remote_experts=core.decoder.remote_experts,
            decode_local_experts=core.decoder.local_experts, placement_reads=c.placements,
            decode_step_s=core.decoder.step_s, decode_peer_wait_s=core.decoder.waits_s.peers_s,
            decode_read_wait_s=core.decoder.waits_s.reads_s, decode_split_experts=core.decoder.split_experts,
            slice_runs=core.executor.slice_runs, decode_prefetch_reads=core.decoder.prefetch.read,
            decode_prefetch_hits=core.decoder.prefetch.hits, decode_prefetch_misses=core.decoder.prefetch.misses,
            read_ahead=core.executor.read_ahead.started, read_ahead_used=core.executor.read_ahead.used,
            prefill_split_experts=core.split_runs, decode_fallback_experts=core.decoder.sends.fallback_experts,
            home_prefill_tokens=core.decoder.prompt_tokens, decode_split_attention=core.decoder.split_attention,
            cpu_s=time.process_time(), paced_cpu_s=core.pacer.paced_cpu_s,
            requests=len(core.requests.live()))

    def _flat(self, experts: Iterable[ExpertId]) -> frozenset[int]:
        """Experts as the wire's flat ids (layer * num_experts + index)."""
        return frozenset(expert_to_wire(e, self.core.cfg.num_experts) for e in experts)

    async def Fill(self, request: pb.FillRequest, context: Any) -> pb.FillReply:
        n = self.core.cfg.num_experts
        experts, evict, prefetch = fill_from_proto(request)
        accepted, evicted = await self.core.holdings.fill([expert_from_wire(e, n) for e in experts],
                                                          [expert_from_wire(e, n) for e in evict], prefetch)
        return fill_reply_to_proto([expert_to_wire(e, n) for e in accepted], [expert_to_wire(e, n) for e in evicted])

    async def SetPlacement(self, request: pb.PlacementRequest, context: Any) -> pb.PlacementReply:
        n = self.core.cfg.num_experts
        experts, sources = placement_from_proto(request)
        placed, resident = self.core.holdings.place([expert_from_wire(e, n) for e in experts],
                                           [(expert_from_wire(e, n), holder, address) for e, holder, address in sources])
        return placement_reply_to_proto(placed, resident)

    async def SetRoutingTable(self, request: pb.RoutingTable, context: Any) -> pb.Ack:
        self.core.set_routing_table(routing_table_from_proto(request, self.core.cfg.num_experts))
        return pb.Ack()

    async def AdoptKV(self, request: pb.AdoptKVRequest, context: Any) -> pb.AdoptKVReply:
        a = adopt_kv_from_proto(request)
        if a.sampled < 0:
            raise ValueError(f"sampled must be >= 0, got {a.sampled}")
        rows = await self.core.adopt_kv(a.request_id, a.capacity, a.prompt_tokens, a.sources, a.prefill_here,
                                        (a.sampling, a.sampled))
        if a.prompt_counts:  # a prefill elsewhere counted what the prompt chose: the home reads ahead
            self.core.decoder.prefetch.counted(a.request_id, a.prompt_counts)
        return adopt_kv_reply_to_proto(rows)

    async def DecodeStep(self, request: pb.DecodeStepRequest, context: Any) -> pb.DecodeStepReply:
        spans, logits = decode_step_from_proto(request)
        reply = decode_step_reply_to_proto(await self.core.decode_step(spans, logits))
        if logits:
            await self.link.send(reply.logits)
        return reply

    async def FetchKV(self, request: pb.FetchKVRequest, context: Any) -> pb.KVBlock:
        request_id, layer, chunk = fetch_kv_from_proto(request)
        shard, chunks = self.core.fetch_kv(request_id, layer, chunk)
        block = kv_block_to_proto(KVBlock(request_id=request_id, step=0, layer=layer, sender=self.core.name,
                                          keys=shard.k, values=shard.v, positions=shard.pos, chunk=chunk,
                                          num_chunks=chunks))
        await self.link.send(block.keys, block.values, background=True)  # the move yields to decode traffic
        return block

    async def FetchExpert(self, request: pb.FetchExpertRequest, context: Any) -> pb.ExpertPart:
        layer, index, chunk = fetch_expert_from_proto(request)
        gate, up, down, chunks = await self.core.holdings.expert_part(ExpertId(layer, index), chunk)
        part = expert_part_to_proto(gate, up, down, chunk, chunks)
        await self.link.send(part.gate, part.up, part.down, background=True)  # a migration yields to decode traffic
        return part

    async def PushKV(self, request: pb.KVBlock, context: Any) -> pb.Ack:
        # Room in the inbox is checked before the tensors are copied out of the message.
        self.core.requests.inbox_room(request.request_id, tensor_nbytes(request.keys) + tensor_nbytes(request.values))
        await self.link.receive(request.keys, request.values)
        b = kv_block_from_proto(request)
        await self.core.receive_kv(b.request_id, b.step, b.layer, b.sender, b.chunk, b.num_chunks,
                                   KVShard(b.keys, b.values, b.positions))
        return pb.Ack()

    async def Attend(self, request: pb.AttendRequest, context: Any) -> pb.AttendReply:
        await self.link.receive(request.queries)
        request_id, layer, queries = attend_from_proto(request)
        out, lse = await self.core.attend(request_id, layer, queries)
        reply = attend_reply_to_proto(out, lse)
        await self.link.send(reply.output, reply.lse)
        return reply

    async def RunExperts(self, request: pb.ExpertBatch, context: Any) -> pb.ExpertResult:
        reply = await self.run_batch(request)
        await self.link.send(reply.output)
        return reply

    async def run_batch(self, request: pb.ExpertBatch) -> pb.ExpertResult:
        """A peer's expert batch, from a RunExperts call or the decode data plane."""
        await self.link.receive(request.hidden, request.expert_ids, request.weights)
        b = expert_batch_from_proto(request)
        executor = self.core.executor
        executor.check_batch(b.layer, b.expert_ids, b.part, b.of)
        weights = b.weights.to(b.hidden.dtype)
        executor.check_ahead(b.read_ahead)
        if b.of > 1:
            run = executor.execute_slices(b.layer, b.hidden, b.expert_ids, weights, b.part, b.of, b.read_ahead)
        else:
            run = executor.execute(b.layer, b.hidden, b.expert_ids, weights, b.decode, b.read_ahead)
        return expert_result_to_proto(await run)


async def serve(settings: AgentSettings, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    """Load the dense weights, serve until `stop` is set (or forever)."""
    # Only the compute thread (AgentCore) runs torch on several threads. OpenMP keeps a team of
    # threads for each thread that enters a parallel region, and with more team threads than
    # cores its idle threads sleep at once rather than spin: a second team (this event loop's
    # thread, or the disk thread) made every matmul of the compute thread wake a sleeping
    # thread. A 2-thread bench-model decode step took 11 ms with a 2-thread matmul on the loop's
    # thread between steps, 4.3 ms alone, 5.2 ms with that matmul on 1 thread; an agent's step
    # went from 23 ms (16 ms on 1 thread) to 10.4 ms.
    set_thread_torch_threads(1)
    dtype = getattr(torch, settings.dtype)
    cfg = MoeConfig.load(settings.model_dir)
    ckpt = Checkpoint(settings.model_dir)
    log.info("agent %s: loading dense weights of %s from %s", settings.node_name, cfg.model_type, settings.model_dir)
    dense = load_dense(ckpt, cfg, dtype, progress=lambda m: log.info("agent %s: %s", settings.node_name, m))
    store = ExpertStore(ckpt, cfg, dtype, Throttle(settings.disk_bytes_per_s))
    disk = ThreadPoolExecutor(1, thread_name_prefix="disk", initializer=set_thread_torch_threads, initargs=(1,))
    try:
        policy = LRUPolicy[Key]() if settings.eviction == "lru" else LayerCyclicPolicy(cfg.num_layers)
        buffer = ExpertBuffer(settings.expert_memory_bytes, store.expert_nbytes, store.load, disk, policy,
                              intermediate=cfg.expert_size)
    except BufferTooSmall as exc:
        raise SystemExit(f"--expert-memory: {exc}") from None
    creds = settings.credentials()
    if creds is None:
        log.warning("agent %s: --insecure: plaintext, and anyone who reaches %s may call it", settings.node_name,
                    settings.listen)
    link = Link(settings.link_bytes_per_s, settings.link_latency_s)
    peers = GrpcPeers(settings.node_name, link, creds)
    data = DataClient(link, creds=creds)
    core = AgentCore(settings.node_name, cfg, dense, buffer, peers, pacer=ComputePacer(settings.compute_share),
                     data=data, limits=settings.limits, torch_threads=settings.torch_threads)
    # The gate comes first (a refused caller or message gets no work and no emulated latency); the
    # latency wraps the handlers inside the error mapping: a failed call is answered without it
    # (errors are not the traffic being emulated).
    # No SO_REUSEPORT (gRPC's default on Linux): with it a second agent on the same port started
    # fine and took half of the first one's calls.
    gate = GateInterceptor(secure=creds is not None, max_control_bytes=control_message_bytes(settings.limits))
    server = grpc.aio.server(interceptors=[gate, ErrorInterceptor(), LatencyInterceptor(link)],
                             options=[*SERVER_OPTIONS, ("grpc.so_reuseport", 0)])
    core.decoder.sends.expert_read_s = store.expert_read_s  # auto splits an unheld expert where reading it costs
    flops = await core.thread.unpaced(measure_expert_flops, cfg, dtype, 256, settings.compute_share)
    servicer = Servicer(core, settings, link, store, model_fingerprint(settings.model_dir), flops)
    data_server = DataServer(settings.node_name, servicer.run_batch, link, creds=creds)
    pb_grpc.add_NodeAgentServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if creds is None:
        server.add_insecure_port(settings.listen)
    else:
        server.add_secure_port(settings.listen, creds.grpc_server())
    # After the gRPC port is bound: an ephemeral port picked before could be the very port the
    # launcher found free for the gRPC server (the kernel hands a just-freed port out again).
    servicer.data_port = await data_server.start(split_host(settings.listen), settings.data_port)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("potluck.v1.NodeAgent", health_pb2.HealthCheckResponse.SERVING)
    log.info("agent %s: serving on %s, decode data plane on port %d (expert memory %s, disk %s, link %s, latency %g "
             "ms)", settings.node_name, settings.listen, servicer.data_port, format_size(settings.expert_memory_bytes),
             format_rate(settings.disk_bytes_per_s), format_rate(settings.link_bytes_per_s),
             settings.link_latency_s * 1e3)
    if ready is not None:
        ready.set()
    reaper = asyncio.create_task(_expire_forever(core))
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        reaper.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=2.0)
        await data_server.close()
        await data.close()
        await peers.close()
        disk.shutdown(wait=False, cancel_futures=True)
        log.info("agent %s: stopped", settings.node_name)


async def _expire_forever(core: AgentCore) -> None:
    """Release requests past their time to live, checked a few times per time to live."""
    while True:
        await asyncio.sleep(min(30.0, core.limits.request_ttl_s / 4))
        await core.expire()


def run_agent(settings: AgentSettings) -> None:
    """Run one agent in this process until SIGINT or SIGTERM."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop=stop)

    asyncio.run(main())
