"""The agent's core: one request's steps, layer by layer, on this agent's shard of the tokens.

No gRPC here: peers are reached through an injected `PeerTransport`, and all torch work runs on
one compute thread so the event loop stays free for messages while expert reads run on the disk
thread (overlap). The servicer (`service.py`) only converts messages and delegates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Protocol

import torch

from node_agent.attention import KVPeers, PeerAttention
from node_agent.compute_profile import ComputeThread
from node_agent.dataplane import DataClient
from node_agent.decode import DecodePeers, Decoder
from node_agent.dispatch import Executors, LayerPlan, only, split_by_executor
from node_agent.executor import ExpertExecutor
from node_agent.expert_buffer import ExpertBuffer
from node_agent.holdings import ExpertPeers, Holdings
from node_agent.grouped import GroupedPasses
from node_agent.limits import AgentLimits, RequestTable, check_in_range, check_kv_block, check_plan, check_step
from node_agent.model import moe, slots
from node_agent.model.config import MoeConfig
from node_agent.peers import row_chunks
from node_agent.recall import PredictionRecall
from node_agent.state import DirectSends, EarlyExperts, KVShard, Peer, StepState, UnknownRequest
from node_agent.throttle import ComputePacer
from protos.ids import ExpertId, NodeId
from protos.messages import DecodeResult, DecodeSpan, LayerReport, SamplingParams
from protos.routing import RoutingTable

log = logging.getLogger(__name__)


class PeerTransport(KVPeers, DecodePeers, ExpertPeers, Protocol):
    """Calls to other agents, each named (name, address): a failed call names the peer."""


class AgentCore:
    def __init__(
        self,
        name: str,
        cfg: MoeConfig,
        dense: moe.DenseWeights,
        buffer: ExpertBuffer,
        peers: PeerTransport,
        peer_timeout_s: float = 120.0,
        pacer: ComputePacer | None = None,
        data: DataClient | None = None,
        limits: AgentLimits = AgentLimits(),
        torch_threads: int = 1,
    ) -> None:
        self.name, self.cfg, self.dense, self.buffer, self.peers = name, cfg, dense, buffer, peers
        self.limits = limits
        self.pacer = pacer or ComputePacer(0)
        self.thread = ComputeThread(self.pacer, torch_threads)
        self.compute = self.thread.run  # torch work, on the compute thread
        self._unpinning: set[asyncio.Future[None]] = set()  # early runs' releases of their experts
        self.passes = GroupedPasses(self.pacer, self.thread.pool, self.thread.queued.any)
        self.attention = PeerAttention(name, cfg, dense, peers, self.compute, peer_timeout_s)
        # A few decode rows may run on the event loop (saving two thread hops), whose torch has one
        # thread (service.serve): only where the compute thread has no more, and is not paced.
        inline = self.pacer.share == 0 and torch_threads == 1
        self.decoder = Decoder(name, cfg, dense, buffer, peers, self.compute, peer_timeout_s, data, inline=inline)
        self.requests = RequestTable(name, limits, self.decoder.kv.caches)
        self.executor = ExpertExecutor(cfg, buffer, self.passes, self.compute, self.decoder.mix, inline=inline)
        self.decoder.sends.run_slices = self.executor.execute_slices  # a split layer's slices here
        self.decoder.sends.read_ahead = self.executor.read_ahead.start  # and my slices of its guessed next layer
        self.holdings = Holdings(name, cfg, dense.embed.dtype, buffer, peers)  # fills, placement, peers' fetches
        self.early_used = 0  # experts run early on my own tokens whose share the plan confirmed
        self.early_dropped = 0  # experts run early that the plan overruled (it sent those slots elsewhere)
        self.direct_sent = 0  # experts whose tokens went to their executor by a direct route
        self.split_runs = 0  # (layer, expert) runs of my tokens split into slices by the plan
        self.attention_s = 0.0  # total seconds in attention, all requests
        self.recall = PredictionRecall()  # of the prefetch's predictions, on my own tokens

    async def expire(self, now: float | None = None) -> list[str]:
        """Release every request no message touched for the limits' time to live (its server
        died, or forgot it); returns their ids."""
        stale = self.requests.stale(time.monotonic() if now is None else now)
        for request_id in stale:
            log.warning("agent %s: released request %s, untouched for %.0f s", self.name, request_id,
                        self.limits.request_ttl_s)
            await self.release(request_id)
        return stale


    def _step(self, request_id: str) -> StepState:
        step = self.requests.get(request_id).step
        if step is None:
            raise UnknownRequest(f"request {request_id!r} has no step in progress on agent {self.name!r}")
        return step

    # Control plane ---------------------------------------------------------------------------

    async def begin_step(self, request_id: str, step: int, token_ids: Sequence[int], positions: Sequence[int],
                         peers: Sequence[Peer], all_logits: bool, predict: bool = False) -> LayerReport:
        """Embed this agent's new tokens; with predict, guess layer 0's routing from them (the
        report is empty without)."""
        check_step(self.cfg, self.limits, self.name, token_ids, positions, [p.name for p in peers])
        state = self.requests.open(request_id)
        state.commit_step()
        ids = torch.tensor(list(token_ids), dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size})")
        hidden = self.dense.embed[ids]  # [T, D]
        st = state.step = StepState(step, torch.tensor(list(positions), dtype=torch.long), hidden, tuple(peers), all_logits)
        if not (predict and self.cfg.is_moe(0)):
            return LayerReport(NodeId(self.name), (), frozenset(), frozenset())
        predicted = [0] * self.cfg.num_experts
        if ids.numel():
            predicted = await self.compute(moe.predicted_counts, self.dense.layers[0], self.cfg, hidden)
            st.predicted = (0, frozenset(e for e, c in enumerate(predicted) if c))
        return LayerReport(NodeId(self.name), (), frozenset(), frozenset(), predicted=tuple(predicted),
                           resident_total=self.buffer.slots_taken, next_resident=frozenset(self.buffer.resident(0)),
                           next_loading=frozenset(self.buffer.loading(0)))

    async def forward(self, request_id: str, layer: int, plan: LayerPlan, prefetch: Sequence[int] = (),
                      predict: bool = False, direct: Mapping[int, str] | None = None) -> LayerReport:
        """MoE of layer-1 by `plan`, then attention and router of `layer`. Predicted experts of
        `layer` start loading first, so the disk works while attention computes. After the
        router, my tokens of the experts in `direct` (expert -> executor) go straight to their
        executors, and those of experts I hold start here."""
        check_in_range("layer", [layer], 0, self.cfg.num_layers)
        check_in_range("prefetched experts", list(prefetch), 0, self.cfg.num_experts)
        check_in_range("directly routed experts", list(direct or {}), 0, self.cfg.num_experts)
        st = self._step(request_id)
        if layer > 0:
            check_plan(self.cfg, layer - 1, plan.mine, plan.executes, [p.name for p in st.peers], plan.splits)
        direct = direct or {}
        mine = [ExpertId(layer, e) for e, x in direct.items() if x == self.name]
        self.buffer.protect([ExpertId(layer - 1, e) for e in plan.executes] + [ExpertId(layer, e) for e in prefetch] + mine)
        for e in prefetch:
            await self.buffer.prefetch(ExpertId(layer, e))
        if layer > 0:
            await self._apply_mlp(request_id, st, layer - 1, plan)
        t0 = time.perf_counter()
        if st.positions.numel():
            await self.attention.layer(request_id, self.requests.get(request_id), st, layer)
        attention_s = time.perf_counter() - t0
        self.attention_s += attention_s
        nxt = layer + 1
        predicting = predict and nxt < self.cfg.num_layers and self.cfg.is_moe(nxt)
        # Norm, router and the next layer's guess in one job: each job is a trip from the event
        # loop to the compute thread and back, and these three only feed one another.
        moe_in, st.route, predicted = await self.compute(self._route_and_predict, st, layer, predicting)
        st.moe_in = moe_in
        counts: list[int] = []
        if st.route is not None:
            ids = st.route[0]
            counts = torch.bincount(ids[ids >= 0], minlength=self.cfg.num_experts).tolist()
            if st.predicted is not None and st.predicted[0] == layer:
                self.recall.score(st.predicted[1], counts)
        elif self.cfg.is_moe(layer):
            counts = [0] * self.cfg.num_experts
        if predicted is not None:
            st.predicted = (nxt, frozenset(e for e, c in enumerate(predicted) if c))
        elif predicting:
            predicted = [0] * self.cfg.num_experts
        if st.route is not None:  # queued after the prediction, so the report is not held up
            sent = {e: x for e, x in direct.items() if x != self.name}
            st.direct = self._send_direct(request_id, st, layer, sent)
            st.early = self._start_early(layer, moe_in, *st.route, skip=frozenset(sent))
        buf = self.buffer
        return LayerReport(
            NodeId(self.name), tuple(counts), frozenset(buf.resident(layer)), frozenset(buf.loading(layer)),
            attention_s=attention_s, predicted=tuple(predicted or ()), resident_total=buf.slots_taken,
            next_resident=frozenset(buf.resident(nxt) if predicting else ()),
            next_loading=frozenset(buf.loading(nxt) if predicting else ()))

    def _send_direct(self, request_id: str, st: StepState, layer: int, routes: Mapping[int, str]) -> DirectSends | None:
        """Send my tokens of the experts in `routes` to their executors now, one batch each."""
        assert st.route is not None
        ids = st.route[0]
        experts = sorted(frozenset(routes) & frozenset(ids[ids >= 0].unique().tolist()))
        if not experts:
            return None
        unknown = sorted({routes[e] for e in experts} - {p.name for p in st.peers})
        if unknown:
            raise ValueError(f"direct routes name executors outside the step: {', '.join(unknown)}")
        subs = split_by_executor(only(ids, experts), LayerPlan({e: [(routes[e], 0)] for e in experts}), self.name)
        sends = self._executors(request_id, st, layer).whole(subs)
        self.direct_sent += len(experts)
        return DirectSends(layer, frozenset(experts), tuple(asyncio.ensure_future(s) for s in sends))

    def _executors(self, request_id: str, st: StepState, layer: int) -> Executors:
        """Where my pending MoE slots of `layer` run: here or on the step's peers."""
        assert st.route is not None and st.moe_in is not None
        return Executors(self.name, self.executor, self.peers, {p.name: p.address for p in st.peers}, request_id,
                         layer, st.moe_in, st.route[1])

    def _start_early(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                     skip: frozenset[int] = frozenset()) -> EarlyExperts | None:
        """Run my tokens through the experts of `layer` I hold (but those in `skip`, sent to another
        executor) while the scheduler gathers the other agents' reports and plans: the compute
        thread would otherwise wait for the plan."""
        experts = (frozenset(self.buffer.resident(layer)) & frozenset(ids[ids >= 0].unique().tolist())) - skip
        if not experts:
            return None
        # Taken now, while resident (acquire does not wait for a resident expert), so nothing
        # can evict them between this report and the pass.
        held = {e: self.buffer.acquire_resident(ExpertId(layer, e)) for e in sorted(experts)}
        # The layer's pass: the peers' batches that arrive meanwhile join it.
        out = asyncio.ensure_future(self.passes.slots(layer, x, ids, weights, held))

        async def release() -> None:
            for e in held:
                await self.buffer.release(ExpertId(layer, e))

        # Unpinned when the run ends in any way, also when it is cancelled before its first step
        # (its request released before the event loop got to it): a `finally` inside the run
        # would then never execute, and the experts would stay pinned for good.
        def unpin(_: object) -> None:
            task = asyncio.ensure_future(release())
            self._unpinning.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._unpinning.discard)

        out.add_done_callback(unpin)
        return EarlyExperts(layer, experts, out)

    def _route_and_predict(self, st: StepState, layer: int, predicting: bool
                           ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, list[int] | None]:
        """(normed MoE input, this layer's routing or None, next layer's predicted counts or None).
        Runs on the compute thread."""
        w = self.dense.layers[layer]
        moe_in = moe.rms_norm(st.hidden, w.post_norm, self.cfg.rms_eps)
        if not st.positions.numel():
            return moe_in, None, None
        route = None
        if self.cfg.is_moe(layer):
            ids, weights = moe.route(w, self.cfg, moe_in)
            keep = st.final_only(layer, self.cfg.num_layers)
            if keep is not None:  # a prefill reads k experts of the last layer, not nearly all
                ids = torch.where(keep[:, None], ids, torch.full_like(ids, -1))  # -1: skipped slot
            route = ids, weights
        if not predicting:
            return moe_in, route, None
        keep = st.final_only(layer + 1, self.cfg.num_layers)
        hidden = st.hidden if keep is None else st.hidden[keep]
        return moe_in, route, moe.predicted_counts(self.dense.layers[layer + 1], self.cfg, hidden)

    async def finish(self, request_id: str, plan: LayerPlan) -> tuple[torch.Tensor | None, torch.Tensor]:
        """MoE of the last layer; logits if this agent owns the step's last position (with
        all_logits: of every new token it owns)."""
        st = self._step(request_id)
        check_plan(self.cfg, self.cfg.num_layers - 1, plan.mine, plan.executes, [p.name for p in st.peers])
        self.buffer.protect([ExpertId(self.cfg.num_layers - 1, e) for e in plan.executes])
        await self._apply_mlp(request_id, st, self.cfg.num_layers - 1, plan)
        last = st.last_position
        if st.all_logits and st.positions.numel():
            rows = torch.arange(st.positions.numel())
        elif st.positions.numel() and int(st.positions.max()) == last:
            rows = (st.positions == last).nonzero()[0]
        else:
            return None, torch.empty(0, dtype=torch.long)
        logits = await self.compute(moe.final_logits, self.dense, self.cfg, st.hidden[rows])
        return logits, st.positions[rows]

    async def release(self, request_id: str) -> None:
        self.decoder.kv.release(request_id)
        self.decoder.prefetch.release(request_id)
        self.decoder.order.moved()  # a later step of it, waiting for its turn, goes on (to be refused)
        state = self.requests.pop(request_id)
        if state is not None:
            await state.release()

    # Decode (node_agent/decode.py) -------------------------------------------------------------

    async def adopt_kv(self, request_id: str, capacity: int, prompt: int, sources: Sequence[tuple[str, str]],
                       here: bool = False, sampling: tuple[SamplingParams, int] | None = None) -> int:
        """Become the request's home for decode: my prefill K/V moves into a preallocated cache and
        the sources' (name, address) K/V is pulled in the background; returns my rows. With
        `here`, no prefill ran: decode steps bring the prompt in spans. Its tokens are sampled here
        with `sampling` (parameters, and how many of its tokens were sampled before)."""
        self.requests.admit(request_id)
        state = None if here else self.requests.pop(request_id)
        own: dict[int, KVShard] = {}
        if state is not None:
            state.commit_step()
            own = state.kv
            await state.release()
        return self.decoder.kv.adopt(request_id, capacity, prompt, own, sources, here, sampling)

    def fetch_kv(self, request_id: str, layer: int, chunk: int) -> tuple[KVShard, int]:
        """Chunk `chunk` of my K/V rows of `layer` for the request's home, and the number of chunks."""
        state = self.requests.get(request_id)
        state.commit_step()  # the prefill's last step is over: its K/V is final
        if not 0 <= layer < self.cfg.num_layers:
            raise ValueError(f"layer {layer} is outside [0, {self.cfg.num_layers})")
        shard = state.kv.get(layer)
        if shard is None:
            raise UnknownRequest(f"request {request_id!r} has no K/V for layer {layer} on agent {self.name!r}")
        chunks = row_chunks(shard.k.shape[0], 2 * shard.k[0].numel() * shard.k.element_size() if shard.k.shape[0] else 1)
        if not 0 <= chunk < len(chunks):
            raise ValueError(f"chunk {chunk} is outside [0, {len(chunks)})")
        rows = chunks[chunk]
        return KVShard(shard.k[rows], shard.v[rows], shard.pos[rows]), len(chunks)

    async def decode_step(self, spans: Sequence[DecodeSpan], logits: bool = False) -> DecodeResult:
        """One step of the requests homed here (Decoder.run)."""
        return await self.decoder.run(spans, logits)

    def set_routing_table(self, table: RoutingTable) -> None:
        self.decoder.set_table(table)

    # Attention (node_agent/attention.py) ------------------------------------------------------

    async def attend(self, request_id: str, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A peer's queries over my K/V from earlier steps (all of it precedes them)."""
        return await self.attention.over_cache(request_id, self.requests.get(request_id), layer, q)

    async def receive_kv(self, request_id: str, step: int, layer: int, sender: str, chunk: int, num_chunks: int,
                         shard: KVShard) -> None:
        """A peer's K/V block (one chunk of it) for a step of a request, checked against the model
        and the step, and held in the inbox only while the inbox has room."""
        state = self.requests.get(request_id)
        check_kv_block(self.cfg, layer, chunk, num_chunks, shard.k, shard.v, shard.pos)
        current = state.step.step if state.step is not None else None
        if current is not None and step != current:
            raise ValueError(f"K/V for step {step} of request {request_id!r}, whose step is {current}")
        self.requests.inbox_room(request_id, 2 * shard.k.nbytes + shard.pos.nbytes)
        await state.deliver(step, layer, sender, chunk, num_chunks, shard)

    # Experts ---------------------------------------------------------------------------------

    async def _apply_mlp(self, request_id: str, st: StepState, layer: int, plan: LayerPlan) -> None:
        """h += MoE(layer) for my tokens: split slots by executor, run local and remote at once."""
        x = st.moe_in
        if x is None or not st.positions.numel():
            return
        w = self.dense.layers[layer]
        if w.dense_mlp is not None:
            mlp = w.dense_mlp
            st.hidden = await self.compute(lambda: st.hidden + moe.swiglu(mlp, x))
            return
        assert st.route is not None
        ids = st.route[0]
        jobs: list[Awaitable[tuple[torch.Tensor, torch.Tensor]]] = []
        direct, st.direct = st.direct, None
        if direct is not None and direct.layer == layer:  # already on their way, whatever the plan says
            jobs.extend(direct.results)
            ids = only(ids, direct.experts, keep=False)
        elif direct is not None:
            for result in direct.results:
                result.cancel()
        split = frozenset(plan.splits) & frozenset(ids[ids >= 0].unique().tolist())
        if split:
            jobs.extend(self._executors(request_id, st, layer).slices(only(ids, split), plan.splits))
            self.split_runs += len(split)
            ids = only(ids, split, keep=False)
        subs = split_by_executor(ids, plan, self.name)
        early, st.early = st.early, None
        if early is not None and early.layer != layer:
            early.out.cancel()
        elif early is not None:
            local = subs.get(self.name, torch.full_like(ids, -1))
            agreed = sorted(e for e in early.experts - split if int((ids == e).sum()) == int((local == e).sum()))
            self.early_used += len(agreed)
            self.early_dropped += len(early.experts) - len(agreed)
            if agreed:
                jobs.append(self._early_share(early.out, agreed))
                rest = only(local, agreed, keep=False)
                subs.pop(self.name, None)
                if bool((rest >= 0).any()):
                    subs[self.name] = rest
            else:
                early.out.cancel()
        outs = await asyncio.gather(*jobs, *self._executors(request_id, st, layer).whole(subs))

        st.hidden = await self.compute(slots.with_rows, st.hidden, outs)
        st.moe_in, st.route = None, None

    @staticmethod
    async def _early_share(out: asyncio.Future[slots.SlotOutputs], experts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return (await out).only(experts)

