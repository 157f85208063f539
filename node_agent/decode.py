"""Decode on a request's home agent: the scheduler out of the layer loop.

    AdoptKV   -> KVCache (preallocated [L, KVH, capacity, hd]; the prompt's K/V from this agent's
                 prefill shard, and from the other agents' shards pulled layer by layer in the
                 background, each layer's `ready` set when all its rows are in; or, prefill_here,
                 none: the home computes the prompt itself in its steps' spans)
    DecodeStep(a span of every request homed here that takes part: its next token, or a chunk of
                 its prompt) -> compute jobs, each running layer after layer: add the previous
                 layer's remote expert outputs, attention over each request's cache (causal within
                 a span), router, the experts this agent holds; a layer needing experts it lacks
                 hands their tokens to the event loop from inside the job (`decode_sends.py`), which
                 sends them to their holders (RoutingTable, on the data plane) while the job runs
                 the local ones, and ends the job (the last layer's experts run for each span's
                 last row only) -> logits of each span's last token -> the token
                 sampled after each span past its prompt (`step_order.StepOrder` orders a request's steps)

A step waits on peers at most once per layer (the remote holders, in parallel; or K/V still
arriving), and not at all when every expert it needs is resident here: then it is one job. While
a prompt's K/V is still moving here, a layer whose rows are further off than a round trip is
attended where they are instead (split-KV: the home's partial over the rows it holds, merged
with the sources' partials, `decode_attention.py`); that layer waits once for them, and once more
if it also sends experts. A step of many rows (prompts prefilled together, or one long prompt)
goes on, after its first layer that called peers, as two halves at once, each with its own
round trip a layer (`decode_batch.halves`); where the cut falls inside a prompt, the second
piece's layers wait for the first's, whose K/V they attend to (`Run.after`). Peers are reached through an injected transport and
torch work goes through the agent's compute thread, as in prefill.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch

from node_agent.attention import Compute
from node_agent.dataplane import DataClient
from node_agent.decode_attention import attend_spans, merge_split
from node_agent.decode_batch import DecodeBatch, decode_batch, halves
from node_agent.decode_prefetch import HomePrefetch
from node_agent.decode_run import Run, Waits, join, parts_of
from node_agent.decode_sends import DecodePeers, Dispatch, LayerSends, gather, hand_over
from node_agent.expert_buffer import ExpertBuffer
from node_agent.kv_cache import HomeCaches, attend_where_it_is
from node_agent.model import moe, slots
from node_agent.model.config import MoeConfig
from node_agent.step_order import StepOrder
from protos.messages import DecodeResult, DecodeSpan, TokenEvent
from protos.routing import RoutingTable
from protos.sampling import sample, token_generator



# What a synchronous wait on peers costs until one is measured: a LAN round trip with both
# sides' software (the split-KV choice weighs it against K/V still on its way).
DEFAULT_ROUND_TRIP_S = 0.002

# An unpaced home whose last step called peers runs a step of this many tokens on its event loop,
# a layer per turn of the loop, rather than as compute jobs: a job per remote layer cost two
# thread hops (as on the holders, executor.INLINE_ROWS), 2-3 ms a token on the emulated LAN, and
# on a batched step the compute thread's hand-over of the sends took 0.5 ms a layer to reach the
# loop. Its expert calls leave when the layer hands them over (their latency counts from there)
# but are written once the loop is free again. So a layer that sends experts runs at most
# INLINE_LOCAL_EXPERTS of its local ones on the loop (one token has at most one then: well within
# a link's latency); more go to the compute thread after the sends are on their way (8 rows
# running all theirs on the loop first took 8 LAN streams from 82 to 100 ms a step). A home with
# every expert resident runs a step as one job (two hops a token), and steps with more tokens
# stay on the compute thread, whose sends go out while it runs the local experts.
HOME_INLINE_ROWS = 8
INLINE_LOCAL_EXPERTS = 1


class Decoder:
    """Runs decode steps for the requests homed on this agent."""

    def __init__(self, name: str, cfg: MoeConfig, dense: moe.DenseWeights, buffer: ExpertBuffer,
                 peers: DecodePeers, compute: Compute, peer_timeout_s: float = 120.0,
                 data: DataClient | None = None, round_trip_s: float = DEFAULT_ROUND_TRIP_S, inline: bool = False) -> None:
        self.name, self.cfg, self.dense, self.buffer, self.peers = name, cfg, dense, buffer, peers
        self.compute = compute
        self.peer_timeout_s = peer_timeout_s
        self.rope = moe.RopeTable(cfg.head_dim, cfg.rope_theta, dense.embed.dtype)
        self.kv = HomeCaches(name, cfg, dense.embed.dtype, peers)  # the requests homed here
        self.sends = LayerSends(name, buffer, peers, compute, data)  # experts and queries to peers
        self.steps = 0  # steps that decoded a token (prompt-only steps are not decode steps)
        self.tokens = 0  # tokens decoded (spans past their prompt)
        self.prompt_tokens = 0  # prompt tokens prefilled here in spans (prefill_here)
        self.round_trips = 0  # synchronous waits on peers (see DecodeStepReply.round_trips)
        self.remote_experts = 0  # (layer, expert) runs sent to remote holders
        self.local_experts = 0  # (layer, expert) runs on experts held here
        self.split_attention = 0  # (layer, request) attentions over prompt K/V still at its sources
        self.split_experts = 0  # (layer, expert) runs split into slices over the agents (decode_sends)
        self.sends.round_trip_s = lambda: self.round_trip_s
        self.prefetch = HomePrefetch(buffer, [i for i in range(cfg.num_layers) if cfg.is_moe(i)], cfg.num_experts)
        self.step_s = 0.0  # wall time of the decode steps (those counted in `steps`)
        self.waits_s = Waits()  # of which waiting: on peers only, or on reads here (peers beside)
        self.round_trip_s = round_trip_s  # a synchronous wait on peers, as last measured
        self.order = StepOrder(self.kv.caches, peer_timeout_s)  # one step at a time, each request's in order
        self.inline = inline  # see HOME_INLINE_ROWS (unpaced agents only)
        self._went_remote = False  # the last step called peers

    def set_table(self, table: RoutingTable) -> None:
        if table.version >= self.sends.table.version:  # a late, older table never replaces a newer one
            self.sends.table = table
            self.prefetch.enabled = table.decode_prefetch
            self.buffer.elsewhere = frozenset(e for e, holders in table.holders.items()
                                              if any(h != self.name for h in holders))

    # One step -------------------------------------------------------------------------------

    def batch(self, spans: Sequence[DecodeSpan]) -> DecodeBatch:
        """A step's spans checked against the caches of the requests homed here (`decode_batch`)."""
        return decode_batch(spans, self.kv.caches, self.cfg.vocab_size, self.name)

    async def run(self, spans: Sequence[DecodeSpan], logits: bool = False) -> DecodeResult:
        """One step of the requests homed here, after every earlier step of the same requests
        (the scheduler sends a step before the reply of the one its spans follow): each span's
        sampled token, the round trips, the requests whose prompt K/V is now all here, and with
        `logits` each span's logits. Steps run one at a time."""
        now = time.monotonic()
        for span in spans:
            if (cache := self.kv.caches.get(span.request_id)) is not None:
                cache.touched = now
        async with self.order.turn(spans):
            batch = self.batch(spans)
            out, trips, tokens, chosen = await self.step(batch)
        gathered = self.kv.newly_gathered([s.request_id for s in batch.spans])
        return DecodeResult(tokens=tokens, round_trips=trips, gathered=tuple(gathered), logits=out if logits else None,
                            selections=chosen)

    async def step(self, batch: DecodeBatch
                   ) -> tuple[torch.Tensor, int, tuple[TokenEvent | None, ...], torch.Tensor | None]:
        """Logits [B, V] (float32) after each span's last token, the round trips it made, the
        token sampled after each span that reaches past its prompt, and the experts every token
        chose at each MoE layer ([MoE layers, T, k] int16; None for a model without them)."""
        began_step = time.monotonic()
        cos, sin = self.rope.at(batch.positions)
        run = Run(batch, cos, sin)
        parts = halves(batch)
        trips, called, waits = await self._layers(run, fork=parts is not None)
        if run.logits is None and parts is not None:  # the rest of the layers as two halves at once
            split = parts_of(run, parts)
            tasks = [asyncio.ensure_future(self._layers(part)) for part in split]
            try:
                tallies = await asyncio.gather(*tasks)
            finally:  # should one half fail, the other may not outlive the step (its turn, its caches)
                for task in tasks:
                    task.cancel()  # (a task that is done stays as it is)
                await asyncio.gather(*tasks, return_exceptions=True)
            join(run, split)
            trips += max(t[0] for t in tallies)
            called |= any(t[1] for t in tallies)
            waits = Waits(waits.peers_s + max(t[2].peers_s for t in tallies),
                          waits.reads_s + max(t[2].reads_s for t in tallies))
        self._went_remote = called
        for span, cache in zip(batch.spans, batch.caches):
            cache.next = span.end
        decoded = sum(span.position >= cache.prompt for span, cache in zip(batch.spans, batch.caches))
        self.prompt_tokens += sum(max(0, min(s.end, c.prompt) - s.position) for s, c in zip(batch.spans, batch.caches))
        if decoded:  # a step that only prefills is not a decode step (nor are its round trips)
            self.steps += 1
            self.tokens += decoded
            self.round_trips += trips
            self.step_s += time.monotonic() - began_step
            self.waits_s.peers_s += waits.peers_s
            self.waits_s.reads_s += waits.reads_s
        assert run.logits is not None
        if run.chosen:
            self._prefetch_counts(batch, run.chosen)
        chosen = torch.stack(run.chosen).to(torch.int16) if run.chosen else None
        return run.logits, trips, run.tokens, chosen

    async def _layers(self, run: Run, fork: bool = False) -> tuple[int, bool, Waits]:
        """Run's layers from `run.layer` on, through the logits: (round trips, whether it called
        peers, its waits). With `fork`, it stops after the first layer whose experts went to
        peers, before the next (`halves`)."""
        loop, batch = asyncio.get_running_loop(), run.batch
        trips, called, waits = 0, False, Waits()
        while run.logits is None:
            inline = self.inline and self._went_remote and len(batch.token_ids) <= HOME_INLINE_ROWS
            if run.layer == self.cfg.num_layers:  # the last layer's remote outputs are in
                run.logits = self._inline(self._logits, run) if inline else await self.compute(self._logits, run)
                run.moved()
                break
            if run.paused is None:
                run.split = self._split(run)
                began = time.monotonic()
                waited = [await c.wait(run.layer, self.peer_timeout_s)
                          for i, c in enumerate(batch.caches) if i not in run.split]
                if any(waited):
                    trips += 1
                    waits.peers_s += time.monotonic() - began
            # The resident experts of the layers ahead, pinned for one job, so that it can run
            # layer after layer; unpinned before waiting on anything, so that reads the job asked
            # for (or peers' batches) can find room.
            if run.after is not None:  # cut inside a span: the first piece's K/V of this layer first
                await run.after.past(run.layer)
            ahead = run.layer + 1 if inline else self.cfg.num_layers  # an inline job runs one layer
            run.pins = {layer: self.buffer.pin_layer(layer) for layer in range(run.layer, ahead)}
            run.used = {}
            dispatch = Dispatch(inline=inline)
            try:
                if inline:
                    self._inline(self._run_layers, loop, dispatch, run)
                    await self._run_local(run)
                else:
                    await self.compute(self._run_layers, loop, dispatch, run)
            finally:
                for pins in run.pins.values():
                    await self.buffer.unpin_layer(pins, run.used.get(pins.layer, ()))
                self.local_experts += sum(len(used) for used in run.used.values())
            run.moved()
            if dispatch.remote or dispatch.attends:
                trips, called = trips + 1, True
                self.remote_experts += dispatch.remote
                self.split_experts += dispatch.split
                self.split_attention += len(dispatch.attends)
            if inline and not dispatch.runs and not dispatch.attends:
                await asyncio.sleep(0)  # let waiting messages in between two layers run on the loop
            began = time.monotonic()
            run.done = await gather(dispatch.runs)
            for i, part in await gather(dispatch.attends):
                run.partials[i].append(part)
            waited_s = time.monotonic() - began
            if dispatch.reads:
                waits.reads_s += waited_s
            elif dispatch.remote or dispatch.attends:
                waits.peers_s += waited_s
                if not dispatch.split:  # (a split's slices may wait on reads: not a round trip)
                    self.round_trip_s = waited_s  # the pace a split-KV or split-expert choice weighs
            if fork and dispatch.remote and run.paused is None and run.layer < self.cfg.num_layers:
                break
        return trips, called, waits

    def _run_layers(self, loop: asyncio.AbstractEventLoop, dispatch: Dispatch, run: Run) -> None:
        """On the compute thread: layers from `run.layer` on, until one hands experts to the event
        loop (their outputs are needed before the next layer), or the next layer's prompt K/V is
        not in yet; and the logits if it gets through the last layer with nothing handed out.
        With every expert resident here, a whole step is one job."""
        self._layers_from(loop, dispatch, run)

    async def _run_local(self, run: Run) -> None:
        """The local experts an inline layer left (`run.local`), on the compute thread once the
        layer's sends have had a turn of the loop to leave; their pins are still held."""
        if run.local is None:
            return
        local, run.local = run.local, None
        await asyncio.sleep(0)
        out = await self.compute(slots.mix_experts, *local)
        if out is not None:
            assert run.h is not None
            run.h = run.h + out

    def _split(self, run: Run) -> frozenset[int]:
        """The decode tokens that attend at `run.layer` over prompt K/V still at its sources:
        their layer is further off than a round trip (`attend_where_it_is`)."""
        return frozenset(
            i for i, (span, c) in enumerate(zip(run.batch.spans, run.batch.caches))
            if not c.ready_at(run.layer) and len(span.token_ids) == 1
            and attend_where_it_is(c.arrival_s(run.layer), self.round_trip_s))

    def _layers_from(self, loop: asyncio.AbstractEventLoop, dispatch: Dispatch, run: Run) -> None:
        L, first = self.cfg.num_layers, True  # the event loop saw to the first layer's K/V
        while run.layer < L:
            layer = run.layer
            if run.paused is not None:  # the split partials of this layer are in
                (h, attn), run.paused = run.paused, None
                run.h, run.used[layer] = self._experts(loop, dispatch, run, layer, h,
                                                       merge_split(attn, run.batch.starts, run.partials))
                run.partials = {}
            else:
                if not first and not all(c.ready_at(layer) for c in run.batch.caches):
                    return  # the event loop waits for that layer's K/V (or attends where it is)
                out = self._layer(loop, dispatch, run, layer)
                if out is None:
                    return  # the sources' partials first
                run.h, run.used[layer] = out
            first, run.split = False, frozenset()
            run.layer += 1
            if dispatch.runs_pending or dispatch.inline:  # the loop blocks for at most one layer
                return
        run.logits = self._logits(run)

    def _layer(self, loop: asyncio.AbstractEventLoop, dispatch: Dispatch, run: Run, layer: int
               ) -> tuple[torch.Tensor, list[int]] | None:
        """One layer: (new h [T, D], experts run here); None when split spans wait for their
        sources' partial attention (the layer resumes from `run.paused`)."""
        cfg, w, batch = self.cfg, self.dense.layers[layer], run.batch
        h = self.dense.embed[batch.token_ids] if run.h is None else slots.with_rows(run.h, run.done)  # [T, D]
        run.done = []
        q, k, v = moe.qkv_at(w, cfg, h, run.cos, run.sin)  # [T, H, hd], [T, KVH, hd]
        attn, partials = attend_spans(layer, batch.spans, batch.caches, batch.starts, q, k, v, run.split)
        if not partials:
            return self._experts(loop, dispatch, run, layer, h, attn)
        run.paused, run.partials = (h, attn), {i: [part] for i, part in partials.items()}
        for i in partials:
            row = q[batch.starts[i]: batch.starts[i] + 1].clone()
            hand_over(loop, dispatch, self.sends.attention, dispatch, i, layer, row, batch.spans[i].request_id,
                       batch.caches[i].sources)
        return None

    def _experts(self, loop: asyncio.AbstractEventLoop, dispatch: Dispatch, run: Run, layer: int,
                 h: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The rest of a layer after attention: (new h [T, D], experts run here). The last layer
        goes on with each span's last row only (`Run.narrowed`)."""
        cfg, w = self.cfg, self.dense.layers[layer]
        h = moe.attention_output(w, h, attn)
        x = moe.rms_norm(h, w.post_norm, cfg.rms_eps)  # [T, D]
        # In the last layer only the logits rows go on: a prompt's other rows are done once their K/V is in.
        keep = run.batch.last_rows if layer == cfg.num_layers - 1 and h.shape[0] > run.batch.ended else None
        if w.dense_mlp is not None:
            if keep is not None:
                h, x, run.narrowed = h[keep], x[keep], True
            return h + moe.swiglu(w.dense_mlp, x), []
        ids, weights = moe.route(w, cfg, x)  # [T, k]
        run.chosen.append(ids)  # every row's choice: the prefetch and the placement count them
        if keep is not None:
            h, x, ids, weights, run.narrowed = h[keep], x[keep], ids[keep], weights[keep], True
        held = run.pins[layer].weights
        needed = set(ids.flatten().tolist())
        elsewhere = sorted(needed - held.keys())
        if elsewhere:  # sent while this thread runs the local experts
            dispatch.runs_pending = True
            hand_over(loop, dispatch, self.sends.experts, dispatch, layer, x, ids, weights, elsewhere,
                      self._guess_next(layer, h))
        local = {e: held[e] for e in needed if e in held}
        if elsewhere and dispatch.inline and len(local) > INLINE_LOCAL_EXPERTS:
            run.local = (x, ids, weights, local)  # after the sends are on their way (`_run_local`)
            return h, sorted(local)
        out = slots.mix_experts(x, ids, weights, local)
        return (h if out is None else h + out), sorted(local)

    def _guess_next(self, layer: int, h: torch.Tensor) -> list[int]:
        """The next layer's experts these rows will likely choose (`moe.predicted_counts`: its
        router on this layer's hidden state after attention), for `LayerSends` to read ahead."""
        nxt = layer + 1
        if not (self.cfg.has_experts(nxt) and self.sends.reads_ahead(h.shape[0])):
            return []
        return [e for e, n in enumerate(moe.predicted_counts(self.dense.layers[nxt], self.cfg, h)) if n]

    def mix(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: Mapping[int, moe.ExpertWeights]
            ) -> torch.Tensor | None:
        """`slots.mix_experts` on a decode batch a peer sent."""
        return slots.mix_experts(x, ids, weights, experts)

    def _logits(self, run: Run) -> torch.Tensor:
        """Logits [B, V] of each span's last token."""
        assert run.h is not None
        h, run.done = slots.with_rows(run.h, run.done), []
        logits = moe.final_logits(self.dense, self.cfg, h if run.narrowed else h[run.batch.last_rows])
        tokens: list[TokenEvent | None] = []
        for row, span, cache in zip(logits, run.batch.spans, run.batch.caches):  # the spans that end here
            token = None
            if span.end >= cache.prompt:
                token = sample(row, cache.sampling, token_generator(cache.sampling.seed or 0, cache.drawn))
                cache.drawn += 1
            cache.sampled = None if token is None else token.token_id
            tokens.append(token)
        run.tokens = tuple(tokens)
        return logits

    def _prefetch_counts(self, batch: DecodeBatch, chosen: list[torch.Tensor]) -> None:
        """Each span's selections to the decode prefetch: a prompt's rows are counted, and its
        plan read once its last span is in; a decode token's are hits or misses."""
        for span, cache, start in zip(batch.spans, batch.caches, batch.starts):
            prompt_rows = max(0, min(span.end, cache.prompt) - span.position)
            if prompt_rows:
                self.prefetch.prompt(span.request_id, chosen, slice(start, start + prompt_rows))
                if span.end >= cache.prompt:
                    self.prefetch.prompt_done(span.request_id)
            elif span.token_ids:
                self.prefetch.decoded(span.request_id, chosen, slice(start, start + len(span.token_ids)))

    def _inline(self, fn: Callable[..., R], *args: object) -> R:
        """A job run on the event loop (see HOME_INLINE_ROWS), as the compute thread would run it."""
        with torch.inference_mode():
            return fn(*args)


R = TypeVar("R")
