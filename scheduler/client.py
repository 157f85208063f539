"""gRPC client the scheduler uses to drive one agent (control plane only: small messages).

Every message is converted in protos/convert.py; a method here builds the call's values, makes the
call and reads the reply. A failed call raises `AgentFailed` naming the agent that failed: this
one, or the peer it names in the error's trailing metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict

import grpc
import torch

from protos.convert import (adopt_kv_reply_from_proto, adopt_kv_to_proto, begin_step_to_proto,
                            cache_state_from_proto, decode_step_reply_from_proto, decode_step_to_proto,
                            failed_agent_from_metadata, fill_reply_from_proto, fill_to_proto, finish_reply_from_proto,
                            finish_to_proto, forward_to_proto, info_from_proto, layer_report_from_proto,
                            placement_reply_from_proto, placement_to_proto, release_to_proto, routing_table_to_proto,
                            step_begun_from_proto)
from protos.limits import CHANNEL_OPTIONS
from protos.messages import AdoptKV, BeginStep, CacheState, DecodeResult, DecodeSpan, Forward, Peer, SamplingParams
from protos.messages import AgentInfo as AgentInfo
from protos.messages import StepBegun as StepBegun
from protos.potluck.v1 import agent_pb2 as pb
from protos.potluck.v1 import agent_pb2_grpc as pb_grpc
from protos.routing import RoutingTable
from protos.security import Credentials, agent_identity, open_channel
from scheduler.errors import AgentFailed
from scheduler.types import AgentSnapshot, LayerReport, NodeId, NodeSpec, RoutingPlan, StepPlan


class AgentClient:
    """With credentials (the server's), the channel accepts only an agent whose certificate names
    `spec.name`: a wrong address in the inventory fails at the handshake instead of reaching
    another agent."""

    def __init__(self, spec: NodeSpec, timeout_s: float = 300.0, creds: Credentials | None = None) -> None:
        self.spec = spec
        self.timeout_s = timeout_s  # deadline of one control call (a Forward may wait on disk reads)
        self._channel = open_channel(spec.address, agent_identity(spec.name), creds, CHANNEL_OPTIONS)
        self._stub = pb_grpc.NodeAgentStub(self._channel)

    @property
    def name(self) -> NodeId:
        return self.spec.name

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, request: object, timeout_s: float | None = None) -> object:
        try:
            return await getattr(self._stub, method)(request, timeout=timeout_s or self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._failed(method, exc) from exc

    def _failed(self, method: str, exc: grpc.aio.AioRpcError) -> AgentFailed:
        why = f"{exc.code().name}: {exc.details()}"
        peer = failed_agent_from_metadata(exc.trailing_metadata())
        if peer is None or peer[0] == self.spec.name:
            return AgentFailed(f"agent {self.spec.name} ({self.spec.address}) failed during {method}: {why}",
                               self.spec.name, self.spec.address, exc.code().name)
        name, address = peer
        return AgentFailed(f"agent {name} ({address}) failed (reported by agent {self.spec.name} during {method}): "
                           f"{why}", name, address, exc.code().name)

    async def info(self, timeout_s: float = 5.0) -> AgentInfo:
        r = await self._call("Info", pb.InfoRequest(), timeout_s)
        assert isinstance(r, pb.InfoReply)
        return info_from_proto(r)

    async def begin_step(self, request_id: str, plan: StepPlan, peers: Sequence[Peer], all_logits: bool,
                         predict: bool = False, holdings: bool = False) -> StepBegun:
        """Start a step; with predict, the report carries layer 0's routing guessed from embeddings;
        with holdings, the reply lists every expert the agent holds."""
        shard = next((s for s in plan.shards if s.node == self.spec.name), None)
        begin = BeginStep(request_id=request_id, step=plan.step, token_ids=shard.token_ids if shard else (),
                          positions=shard.positions if shard else (), peers=tuple(peers), all_logits=all_logits,
                          predict=predict, holdings=holdings)
        r = await self._call("BeginStep", begin_step_to_proto(begin))
        assert isinstance(r, pb.BeginStepReply)
        return step_begun_from_proto(r, self.spec.name)

    async def forward(self, request_id: str, layer: int, plan: RoutingPlan | None, prefetch: Sequence[int] = (),
                      predict: bool = False, direct: Mapping[int, NodeId] | None = None) -> LayerReport:
        forward = Forward(request_id=request_id, layer=layer, plan=plan, prefetch=tuple(prefetch), predict=predict,
                          direct=dict(direct or {}))
        r = await self._call("Forward", forward_to_proto(forward))
        assert isinstance(r, pb.ForwardReply)
        return layer_report_from_proto(r, self.spec.name)

    async def finish(self, request_id: str, plan: RoutingPlan | None) -> tuple[torch.Tensor | None, list[int]]:
        r = await self._call("Finish", finish_to_proto(request_id, plan))
        assert isinstance(r, pb.FinishReply)
        return finish_reply_from_proto(r)

    async def adopt_kv(self, request_id: str, capacity: int, prompt_tokens: int,
                       sources: Sequence[tuple[NodeId, str]], prefill_here: bool = False,
                       sampling: SamplingParams = SamplingParams(max_tokens=1), sampled: int = 0,
                       prompt_counts: Sequence[int] = ()) -> int:
        """Make this agent the request's home for decode (it pulls the prompt's K/V from the
        (name, address) sources in the background; with prefill_here, no prefill ran and decode
        steps bring the prompt); it samples the request's tokens with `sampling`, the first as the
        request's token number `sampled`; `prompt_counts`, the prefill's expert selections, feed its
        decode prefetch. Returns the K/V rows it held already."""
        adopt = AdoptKV(request_id=request_id, capacity=capacity, prompt_tokens=prompt_tokens, sources=tuple(sources),
                        prefill_here=prefill_here, sampling=sampling, sampled=sampled,
                        prompt_counts=tuple(prompt_counts))
        r = await self._call("AdoptKV", adopt_kv_to_proto(adopt))
        assert isinstance(r, pb.AdoptKVReply)
        return adopt_kv_reply_from_proto(r)

    async def decode_step(self, spans: Sequence[DecodeSpan], logits: bool = False) -> DecodeResult:
        """One decode step of the requests homed here: the token sampled after each span (None
        for a span inside its prompt), the round trips to peers the step made, the requests whose
        prompt K/V is now all on the home (their other agents may release it), and with `logits`
        the logits [n, V] after each span."""
        r = await self._call("DecodeStep", decode_step_to_proto(spans, logits))
        assert isinstance(r, pb.DecodeStepReply)
        result = decode_step_reply_from_proto(r)
        if len(result.tokens) != len(spans) or (logits and (result.logits is None or result.logits.dim() != 2
                                                             or result.logits.shape[0] != len(spans))):
            shape = None if result.logits is None else list(result.logits.shape)
            raise AgentFailed(f"agent {self.spec.name} answered {len(spans)} spans with {len(result.tokens)} tokens "
                              f"and logits of shape {shape}", self.spec.name, self.spec.address)
        return result

    async def set_routing_table(self, table: RoutingTable, num_experts: int) -> None:
        await self._call("SetRoutingTable", routing_table_to_proto(table, num_experts), 5.0)

    async def release(self, request_id: str) -> None:
        await self._call("Release", release_to_proto(request_id), 10.0)

    async def _cache_state(self) -> CacheState:
        r = await self._call("CacheState", pb.CacheStateRequest(), 5.0)
        assert isinstance(r, pb.CacheStateReply)
        return cache_state_from_proto(r)

    async def resident(self) -> list[int]:
        """Resident experts as layer * num_experts + index."""
        return sorted((await self._cache_state()).resident)

    async def cache_state(self) -> CacheState:
        """Counters, resident and loading experts, from one reply."""
        return await self._cache_state()

    async def snapshot(self) -> AgentSnapshot:
        return self.snapshot_of(await self._cache_state())

    def snapshot_of(self, state: CacheState) -> AgentSnapshot:
        return AgentSnapshot(self.spec.name, self.spec.address, True, state.resident | state.loading,
                             loading=state.loading, placed=state.placed, labels=self.spec.labels, slices=state.slices,
                             expert_read_s=state.expert_read_s, round_trip_s=state.round_trip_s,
                             **asdict(state.counters))

    async def set_placement(self, experts: Sequence[int], sources: Sequence[tuple[int, str, str]] = ()
                            ) -> tuple[int, int]:
        """Have the agent keep these experts (layer * num_experts + index) resident from now on,
        in place of its previous placement, fetching those in `sources` (expert, holder, address)
        from that agent; returns (experts placed, of them resident now)."""
        r = await self._call("SetPlacement", placement_to_proto(experts, sources), 10.0)
        assert isinstance(r, pb.PlacementReply)
        return placement_reply_from_proto(r)

    async def fill(self, experts: Sequence[int], evict: Sequence[int] = (), prefetch: bool = False
                   ) -> tuple[list[int], list[int]]:
        """Ask the agent to give up the cache entries in `evict`, then read these experts
        (layer * num_experts + index) into free memory at its disk's lowest priority (with
        `prefetch`, a prefetch's); returns (those it took, the rest finding no room; those it
        gave up)."""
        r = await self._call("Fill", fill_to_proto(experts, evict, prefetch), 5.0)
        assert isinstance(r, pb.FillReply)
        return fill_reply_from_proto(r)
