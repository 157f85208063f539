"""Continuous batching: the scheduler's loop over every running request.

    generate(request) -> waiting (FIFO) -> admitted while fewer than max_running run; a prompt
    of at most `home_prefill_max` tokens is prefilled on its home (`prefill_at_home`), a longer
    one sequence-parallel on every agent
    each turn of the loop (`step`):
      1. the oldest request in sequence-parallel prefill runs one step on every agent
         (`RequestRunner.run_step`): its whole prompt when nothing decodes, else the next chunk of
         at most `prefill_chunk` tokens, so running streams wait at most one chunk. After its
         last chunk its first token is sampled, a home agent is chosen (`choose_home`), the home
         adopts the prompt's K/V (AdoptKV), and the routing tables are refreshed
      2. one DecodeStep to every home agent ready for one (fewer than HOME_DEPTH of its steps in
         flight), with a span of every request homed there: a decoding request's next token, or
         the next chunk of a prompt prefilled there (whole prompts while nothing decodes, else at
         most `prefill_chunk` prompt tokens in the turn, step 1's included). The home samples
         each request's tokens (after its last prompt chunk, its first) with the request's
         parameters and generator, handed over in AdoptKV, so a request draws what it would draw
         alone. After a request's first decode step the home holds all of its K/V and the other
         agents release it.
      3. if no step could be sent, the reply of the first step in flight to come back: tokens to
         their consumers, ended requests out.

An agent that fails (AgentFailed names it) is reported (`on_agent_failed`: the engine takes it
out of the cluster at once) and every request it broke is replayed (batch_ends.py): its
prompt and the tokens it already produced become a new prompt, prefilled under a new request id
on the agents up now (so nothing left of the old run can collide with it), and sampling goes on
from the next token's index (token i draws from (seed, i), protos/sampling.py). The consumer sees
a pause, then the tokens an undisturbed run gives. With no agent left it gets the error.

Steps are pipelined: a home gets its next step while the one before is still running, and a
request whose last token is still being sampled takes part with a span that follows it (the home
feeds the token it sampled, once the step before is over). The home thus goes from one step to
the next without waiting for the scheduler; the price is at most one token computed in vain
after a stop token (never past max_tokens), and a request that ends is released once no step
with it is in flight. Each home keeps its own pace: the loop waits for any step, not for every
home's, so a home that reads an expert from disk (or waits on a slow peer) holds back only its
own requests. (Turns once waited for every home's step: with three users on three homes the
inter-token time was the slowest home's step, about twice the mean step.)

The scheduler is not in the layer loop of decode: a step is one call per home agent. Agents are
reached through the `AgentClient`s the cluster callback hands out, so tests and the engine
service drive the same loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter, deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import torch

from protos.messages import DecodeResult
from protos.sampling import request_seed, sample, token_generator
from scheduler.agent_calls import AgentCalls
from scheduler.batch_ends import BatchEnds, ClusterFn, FailedFn
from scheduler.batch_state import BatchSettings as BatchSettings
from scheduler.batch_state import PrefetchTally, Seq, count_prompts, next_spans
from scheduler.client import AgentClient
from scheduler.decode_plan import choose_home, prefill_at_home, user_home
from scheduler.errors import NoAgentsAvailable
from scheduler.partition import after_step, chunk_step
from scheduler.policy import Policy
from scheduler.runner import RequestRunner
from scheduler.token_stream import TokenStream
from scheduler.types import DecodeSpan, GenerationRequest, NodeId, TokenEvent

log = logging.getLogger("potluck.scheduler")

ReadFn = Callable[[NodeId], float]  # seconds an agent's disk would take to read every expert no agent holds
SelectionsFn = Callable[[NodeId, torch.Tensor], None]  # a home's step: [MoE layers, T, k] experts its tokens chose

# Steps in flight per home: the one it computes and the next, sent behind it so that the home
# goes on without waiting for the scheduler (a deeper pipeline would only queue on the agent).
HOME_DEPTH = 2


class Batcher(BatchEnds):
    def __init__(self, cluster: ClusterFn, policy: Policy = Policy(), settings: BatchSettings = BatchSettings(),
                 on_prefilled: Callable[[], Awaitable[None]] | None = None, unheld_read_s: ReadFn | None = None,
                 on_agent_failed: FailedFn | None = None, on_selections: SelectionsFn | None = None) -> None:
        self.cluster = cluster
        self.on_agent_failed = on_agent_failed
        self.on_selections = on_selections  # each decode step's expert choices, for the statistics
        self.unheld_read_s = unheld_read_s or (lambda node: 0.0)
        self.policy = policy
        self.settings = settings
        self.on_prefilled = on_prefilled  # refreshes holdings and routing tables before decode
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.prefetch = PrefetchTally()  # the pool-wide decode prefetch's hits and misses
        self._wake = asyncio.Event()
        self._outbox: list[tuple[Seq, TokenEvent | BaseException | None]] = []  # to consumers, in order
        self._task: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._in_flight: dict[asyncio.Future[bool], NodeId] = {}  # steps sent, not yet handled -> their home
        self._last_step: dict[NodeId, asyncio.Future[bool]] = {}  # each home's latest step (see _decode)
        self._opening: set[asyncio.Future[None]] = set()  # AdoptKV of requests prefilled on their home
        self._refreshing: asyncio.Task[None] | None = None  # on_prefilled, in the background
        self._refresh_again = False  # a prompt got done while it ran: once more after it
        self.calls = AgentCalls()  # every call to agents, abandoned when one is down (agent_down)

    # The consumer's side -----------------------------------------------------------------------

    def submit(self, request: GenerationRequest, on_close: Callable[[], None] | None = None) -> TokenStream:
        """Queue the request now (so the queue's length is exact from this call on); its tokens
        come from the returned stream as they are sampled."""
        sampling = dataclasses.replace(request.sampling, seed=request_seed(request.sampling.seed))
        seq = Seq(dataclasses.replace(request, sampling=sampling))
        self.waiting.append(seq)
        self._ensure_running()
        self._wake.set()
        return TokenStream(seq.out, lambda: self._leave(seq), on_close)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        """`submit` as an async generator (closing it closes the stream)."""
        stream = self.submit(request)
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()

    async def _leave(self, seq: Seq) -> None:
        """The consumer is done with `seq` (finished, failed or gone): out of the queue if it
        never ran, else released on every agent; returns once that is done."""
        seq.cancelled = True
        if seq in self.waiting:
            self.waiting.remove(seq)
            seq.gone.set()
        self._wake.set()
        await asyncio.shield(seq.gone.wait())

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        calls: list[asyncio.Future[Any]] = [*self._in_flight, *self._opening]
        for call in calls:
            call.cancel()
        await asyncio.gather(*self._in_flight, *self._opening, return_exceptions=True)
        for seq in [*self.running, *self.waiting]:  # each stream hears the end, none hangs
            seq.in_flight = 0
            self._finish(seq, NoAgentsAvailable("the server is shutting down"))
        self.waiting.clear()
        self._flush()
        await asyncio.gather(*self._releases, return_exceptions=True)

    # The loop ------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            self._flush()
            await self._wake.wait()
            self._wake.clear()
            try:
                while self.waiting or self.running or self._in_flight:
                    await self.step()
            except Exception as exc:  # a bug: every request hears of it, none hangs
                log.exception("the batching loop failed; ending every request")
                for seq in [*self.running, *self.waiting]:
                    self._finish(seq, exc)
                self.waiting.clear()
                self._in_flight = {}

    async def step(self) -> None:
        """One turn: drop what was cancelled, admit (and start opening the caches of prompts
        prefilled on their home, in the background), one sequence-parallel prefill step, one decode step per home ready for one
        (with its requests' next tokens and prompt chunks); if none was, the first decode reply
        to come back."""
        for seq in [s for s in self.running if s.cancelled]:
            self._finish(seq, None)
        self._admit()
        for s in self.running:  # in the background: no home waits for another's AdoptKV
            if s.at_home and not s.opened and not s.opening:
                s.opening, s.in_flight = True, s.in_flight + 1  # released only once its cache is open
                self._opening.add(asyncio.ensure_future(self._open(s)))
        prefilling = next((s for s in self.running if s.home is None), None)
        generating = any(s.generating for s in self.running)
        budget = self.settings.prefill_chunk if generating else None  # prompt tokens this turn
        if prefilling is not None:
            self._flush()
            ran = await self._prefill(prefilling, chunked=any(s.home is not None for s in self.running))
            budget = None if budget is None else max(0, budget - ran)
        busy = Counter(home for call, home in self._in_flight.items() if not call.done())
        homes = next_spans(self.running, budget, frozenset(h for h, n in busy.items() if n >= HOME_DEPTH))
        for name, group in homes.items():
            self._in_flight[self._send(name, group)] = name
        # Tokens already sampled go to their consumers (who format and stream them) once this
        # turn's calls are on their way: one turn of the event loop lets each call schedule its
        # send, and the consumers, woken after, run behind it, while the agents compute.
        await asyncio.sleep(0)
        self._flush()
        pending: list[asyncio.Future[Any]] = [*self._in_flight, *self._opening]
        if not homes and pending and not any(call.done() for call in pending):
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for opened in [call for call in self._opening if call.done()]:
            self._opening.discard(opened)
            opened.result()  # its failure was handled in _open
        done = [call for call in self._in_flight if call.done()]
        for call in done:
            del self._in_flight[call]
        prompts_done = any([call.result() for call in done])  # a failed step's requests were handled in it
        self._flush()
        if prompts_done:  # as after a sequence-parallel prefill, but no home waits for it
            self._refresh_soon()

    def prompt_counts(self) -> list[list[int]]:
        """The running requests' prefill selections per (MoE layer, expert), flat (those with any)."""
        return [s.counts for s in self.running if not s.ended and any(s.counts)]

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.settings.max_running:
            seq = self.waiting.popleft()
            agents, view = self.cluster()
            if not agents or view is None:
                seq.out.put_nowait(NoAgentsAvailable("no agent is reachable"))
                seq.gone.set()
                continue
            seq.runner = RequestRunner(agents, view, self.policy)
            seq.members = [a.name for a in agents]
            seq.cached, seq.counts = {n: 0 for n in seq.members}, []
            home = choose_home(seq.members, self._homes(), {}, self._user_home(seq))
            if prefill_at_home(len(seq.prompt), self.settings.home_prefill_max, len(agents),
                               self.unheld_read_s(home)):
                seq.at_home, seq.home = True, seq.runner.agents[home]
                seq.members, seq.sources_released = [home], True
                shape = seq.runner.shape  # its steps' selections are counted (`count_prompts`)
                seq.counts = [0] * ((shape.num_layers - len(shape.dense_layers)) * shape.num_experts)
            self.running.append(seq)
            if seq.request.on_admitted is not None and not seq.admitted:
                seq.request.on_admitted()
            seq.admitted = True

    def _homes(self) -> dict[NodeId, int]:
        """Requests with a home, per home agent."""
        homes: dict[NodeId, int] = {}
        for s in self.running:
            if s.home is not None:
                homes[s.home.name] = homes.get(s.home.name, 0) + 1
        return homes

    async def _open(self, seq: Seq) -> None:
        """A cache on the home of a request it prefills itself."""
        assert seq.home is not None
        prompt, epoch, home = len(seq.prompt), seq.epoch, seq.home.name
        try:
            await self.calls.on([home], seq.home.adopt_kv(seq.rid, self._capacity(seq), prompt, [], prefill_here=True,
                                                     sampling=seq.request.sampling, sampled=seq.produced))
            if seq.epoch == epoch:
                seq.opened = True
        except Exception as exc:
            log.error("request %s failed opening its cache on %s: %s", seq.rid, home, exc)
            self._failed(seq, exc, epoch)
        finally:
            seq.in_flight -= 1
            if seq.epoch == epoch:
                seq.opening = False
            if seq.ended:  # cancelled or failed meanwhile: its release waited for this call
                self._release_ended(seq)

    def _refresh_soon(self) -> None:
        """on_prefilled in the background (holdings and routing tables after a prompt prefilled
        on its home: a stale table costs time, never tokens), once more if asked while it runs."""
        if self.on_prefilled is None:
            return
        if self._refreshing is not None and not self._refreshing.done():
            self._refresh_again = True
            return
        self._refreshing = self._track(asyncio.create_task(self._refresh()))

    async def _refresh(self) -> None:
        assert self.on_prefilled is not None
        self._refresh_again = True
        while self._refresh_again:
            self._refresh_again = False
            try:
                await self.on_prefilled()
            except Exception:  # fresher tables next time; no request depends on this one
                log.exception("refreshing holdings and routing tables after a prefill failed")

    @staticmethod
    def _capacity(seq: Seq) -> int:
        """K/V positions its home preallocates: its prompt and the tokens it may still sample
        (the last one sampled is never fed back)."""
        return len(seq.prompt) + seq.request.sampling.max_tokens - len(seq.replayed) - 1

    async def _prefill(self, seq: Seq, chunked: bool) -> int:
        """One sequence-parallel prefill step; returns the prompt tokens it ran."""
        assert seq.runner is not None
        prompt, epoch = seq.prompt, seq.epoch
        start = seq.prefilled
        end = min(len(prompt), start + self.settings.prefill_chunk) if chunked else len(prompt)
        part = self.policy.partition(prompt[start:end], seq.members)
        plan = chunk_step(part, start, seq.steps, seq.cached)
        try:
            shape = seq.runner.shape
            if not seq.counts:
                seq.counts = [0] * ((shape.num_layers - len(shape.dense_layers)) * shape.num_experts)
            logits = await self.calls.on(seq.members, seq.runner.run_step(seq.rid, plan, counts=seq.counts))
            if seq.epoch != epoch:
                return end - start  # replayed meanwhile (an agent went down): this run is over
            seq.cached, seq.steps, seq.prefilled = after_step(plan), seq.steps + 1, end
            if end < len(prompt):
                return end - start
            sampling = seq.request.sampling
            event = self._emit(seq, sample(logits[-1], sampling, token_generator(sampling.seed or 0, seq.produced)))
            self._flush()  # the first token goes out now, not after the home has adopted the K/V
            if not self._done(seq, event):
                await self._adopt(seq, event.token_id)
        except Exception as exc:  # replayed, or reaches the client; nothing is lost silently
            log.error("request %s failed in prefill: %s", seq.rid, exc)
            self._failed(seq, exc, epoch)
        return end - start

    def _user_home(self, seq: Seq) -> NodeId | None:
        assert seq.runner is not None
        agents = seq.runner.agents
        return user_home(seq.request.user, seq.members, {n: agents[n].spec.users for n in seq.members})

    async def _adopt(self, seq: Seq, token: int) -> None:
        """Choose the request's home and have it gather the prompt's K/V."""
        assert seq.runner is not None
        prompt, epoch = len(seq.prompt), seq.epoch
        home = seq.runner.agents[choose_home(seq.members, self._homes(), seq.cached, self._user_home(seq))]
        sources = [(n, seq.runner.agents[n].spec.address) for n in seq.members if n != home.name and seq.cached.get(n)]
        await self.calls.on([home.name, *(n for n, _ in sources)],
                       home.adopt_kv(seq.rid, self._capacity(seq), prompt, sources, sampling=seq.request.sampling,
                                     sampled=seq.produced, prompt_counts=seq.counts))
        if seq.epoch != epoch:
            return
        seq.home, seq.last_token, seq.position = home, token, prompt
        if self.on_prefilled is not None:
            await self.on_prefilled()

    def _send(self, home: NodeId, group: list[tuple[Seq, DecodeSpan, int]]) -> asyncio.Future[bool]:
        """A home's step, sent now; its reply is handled after the reply of the home's step before
        (`_decode`)."""
        client = group[0][0].home  # now: by the time the call runs, a replay may have cleared it
        assert client is not None
        step = asyncio.ensure_future(self._decode(client, group, self._last_step.get(home)))
        self._last_step[home] = step
        return step

    async def _decode(self, home: AgentClient, group: list[tuple[Seq, DecodeSpan, int]],
                      after: asyncio.Future[bool] | None = None) -> bool:
        """One step of the requests homed on one agent (a token each, or a chunk of a prompt);
        returns whether a prompt prefilled there got done. Its reply is handled once the reply of
        `after` (the home's step before) is: two replies in flight may come back in either order,
        and a request's tokens must reach its consumer in the order they were sampled."""
        try:
            result: DecodeResult | None = await self.calls.on([home.name],
                                                         home.decode_step([span for _, span, _ in group]))
        except Exception as exc:
            log.error("decode step on %s failed: %s", home.name, exc)
            result, error = None, exc
        if after is not None and not after.done():
            await asyncio.wait([after])
        if result is not None and result.selections is not None:
            count_prompts(group, result.selections, self.prefetch)
            if self.on_selections is not None:
                self.on_selections(home.name, result.selections)
        prompts_done = False
        for i, (s, span, epoch) in enumerate(group):
            s.in_flight -= 1
            if epoch != s.epoch:  # a step of its run before a replay (whose state is being released)
                if s.ended:
                    self._release_ended(s)
                continue
            token = None if result is None else result.tokens[i]
            if result is None:
                s.coming = 0
                if s.ended:
                    self._release_ended(s)
                else:
                    self._failed(s, error, epoch)
                continue
            elif token is not None:
                s.coming -= 1
            if s.ended:  # cancelled, or stopped while this step was in flight: its token is dropped
                self._release_ended(s)
                continue
            assert result is not None
            if not s.sources_released and s.rid in result.gathered:  # its prompt K/V is all on the home
                self._release(s, [n for n in s.members if n != home.name])
                s.members, s.sources_released = [home.name], True
            if token is None:
                continue  # more of its prompt to come
            prompts_done |= span.position < len(s.prompt)
            self._emit(s, token)
            s.last_token = token.token_id
            self._done(s, token)
        return prompts_done
