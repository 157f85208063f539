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
      2. one DecodeStep per home agent, in parallel, with a span of every request homed there:
         a decoding request's next token, or the next chunk of a prompt prefilled there (whole
         prompts while nothing decodes, else at most `prefill_chunk` prompt tokens in the turn,
         step 1's included). The home samples each request's tokens (after its last prompt
         chunk, its first) with the request's parameters and generator, handed over in AdoptKV,
         so a request draws what it would draw alone. After a request's first decode step the
         home holds all of its K/V and the other agents release it.
      3. the replies of the previous turn's steps: tokens to their consumers, ended requests out.

Steps are pipelined: a turn sends its steps before it waits for the previous turn's, and a
request whose last token is still being sampled takes part with a span that follows it (the home
feeds the token it sampled, once the step before is over). The home thus goes from one step to
the next without waiting for the scheduler; the price is at most one token computed in vain
after a stop token (never past max_tokens), and a request that ends is released once no step
with it is in flight.

The scheduler is not in the layer loop of decode: a step is one call per home agent. Agents are
reached through the `AgentClient`s the cluster callback hands out, so tests and the engine
service drive the same loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch

from protos.messages import DecodeResult
from protos.sampling import generator_state, make_generator, sample
from scheduler.client import AgentClient
from scheduler.decode_plan import choose_home, prefill_at_home
from scheduler.errors import NoAgentsAvailable
from scheduler.partition import after_step, chunk_step
from scheduler.policy import Policy
from scheduler.runner import ClusterView, RequestRunner
from scheduler.token_stream import TokenStream
from scheduler.types import DecodeSpan, GenerationRequest, NodeId, TokenEvent

log = logging.getLogger("potluck.scheduler")

ClusterFn = Callable[[], tuple[Sequence[AgentClient], ClusterView | None]]  # the agents up now, and their view
ReadFn = Callable[[NodeId], float]  # seconds an agent's disk would take to read every expert no agent holds


@dataclass(frozen=True)
class BatchSettings:
    max_running: int = 4  # requests prefilling or decoding at once
    prefill_chunk: int = 512  # prompt tokens per prefill step while other requests decode
    home_prefill_max: int = 1024  # longer prompts are prefilled sequence-parallel (see prefill_at_home)

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 token, got {self.prefill_chunk}")
        if self.home_prefill_max < 0:
            raise ValueError(f"home_prefill_max must be >= 0 tokens, got {self.home_prefill_max}")


@dataclass(eq=False)
class _Seq:
    """One request in the loop: where its state lives and how far it has got."""

    request: GenerationRequest
    generator: torch.Generator
    out: asyncio.Queue[TokenEvent | BaseException | None] = field(default_factory=asyncio.Queue)
    runner: RequestRunner | None = None  # the agents it was admitted on (its prefill members)
    members: list[NodeId] = field(default_factory=list)  # agents holding its state, to release
    prefilled: int = 0  # prompt tokens through prefill so far
    steps: int = 0  # prefill steps run (StepPlan.step of the next one)
    cached: dict[NodeId, int] = field(default_factory=dict)  # K/V rows each agent holds
    at_home: bool = False  # its home prefills the prompt in decode steps (else sequence-parallel)
    opened: bool = False  # at_home: the home has its cache (AdoptKV)
    home: AgentClient | None = None  # set once it decodes (at_home: once admitted)
    last_token: int = -1  # the last token sampled (the next span feeds it unless it is still coming)
    position: int = 0  # where its next span starts
    produced: int = 0  # tokens sampled and handed to the consumer
    coming: int = 0  # tokens steps in flight will sample
    in_flight: int = 0  # steps in flight that include it
    sources_released: bool = False  # the other agents dropped its prompt K/V (the home has it)
    cancelled: bool = False  # the consumer left
    ended: bool = False  # out of the loop; released once no step with it is in flight
    released: bool = False  # its release is under way
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # out of the loop and released

    @property
    def rid(self) -> str:
        return self.request.request_id

    @property
    def generating(self) -> bool:
        """Its whole prompt is sent: its next steps decode tokens."""
        return self.home is not None and self.prefilled == len(self.request.prompt_token_ids)


class Batcher:
    def __init__(self, cluster: ClusterFn, policy: Policy = Policy(), settings: BatchSettings = BatchSettings(),
                 on_prefilled: Callable[[], Awaitable[None]] | None = None, unheld_read_s: ReadFn | None = None) -> None:
        self.cluster = cluster
        self.unheld_read_s = unheld_read_s or (lambda node: 0.0)
        self.policy = policy
        self.settings = settings
        self.on_prefilled = on_prefilled  # refreshes holdings and routing tables before decode
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self._wake = asyncio.Event()
        self._outbox: list[tuple[_Seq, TokenEvent | BaseException | None]] = []  # to consumers, in order
        self._task: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._in_flight: list[asyncio.Future[bool]] = []  # the last turn's steps (True: a prompt got done)
        self._last_step: dict[NodeId, asyncio.Future[bool]] = {}  # each home's latest step (see _decode)

    # The consumer's side -----------------------------------------------------------------------

    def submit(self, request: GenerationRequest, on_close: Callable[[], None] | None = None) -> TokenStream:
        """Queue the request now (so the queue's length is exact from this call on); its tokens
        come from the returned stream as they are sampled."""
        seq = _Seq(request, make_generator(request.sampling.seed))
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

    async def _leave(self, seq: _Seq) -> None:
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
        for call in self._in_flight:
            call.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        self._flush()
        await asyncio.gather(*self._releases, return_exceptions=True)

    # The loop ------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            self._flush()
            await self._wake.wait()
            self._wake.clear()
            while self.waiting or self.running or self._in_flight:
                await self.step()

    async def step(self) -> None:
        """One turn: drop what was cancelled, admit (opening the caches of prompts prefilled on
        their home), one sequence-parallel prefill step, one decode step per home (with its
        requests' next tokens and prompt chunks), then the previous turn's decode replies."""
        for seq in [s for s in self.running if s.cancelled]:
            self._finish(seq, None)
        self._admit()
        opening = [s for s in self.running if s.at_home and not s.opened]
        if opening:
            await asyncio.gather(*(self._open(s) for s in opening))
        prefilling = next((s for s in self.running if s.home is None), None)
        generating = any(s.generating for s in self.running)
        budget = self.settings.prefill_chunk if generating else None  # prompt tokens this turn
        if prefilling is not None:
            self._flush()
            ran = await self._prefill(prefilling, chunked=any(s.home is not None for s in self.running))
            budget = None if budget is None else max(0, budget - ran)
        homes = self._spans(budget)
        previous, self._in_flight = self._in_flight, [self._send(name, g) for name, g in homes.items()]
        # The last turn's tokens go to their consumers (who format and stream them) once this
        # turn's calls are on their way: one turn of the event loop lets each call schedule its
        # send, and the consumers, woken after, run behind it, while the agents compute.
        await asyncio.sleep(0)
        self._flush()
        if not previous and self._in_flight:  # the first turn: its replies are awaited by the next
            return
        prompts_done = any(await asyncio.gather(*previous))
        self._flush()
        if prompts_done and self.on_prefilled is not None:  # as after a sequence-parallel prefill
            await self.on_prefilled()

    def _spans(self, budget: int | None) -> dict[NodeId, list[tuple[_Seq, DecodeSpan]]]:
        """This turn's span of every request that has one, by home: its next token (the one its
        last step is sampling, if that step is still in flight), or its prompt's next chunk within
        `budget` prompt tokens (None: no limit)."""
        homes: dict[NodeId, list[tuple[_Seq, DecodeSpan]]] = {}
        for s in self.running:
            if s.home is None or s.cancelled or (s.at_home and not s.opened):
                continue
            if s.generating:
                if s.produced + s.coming >= s.request.sampling.max_tokens:
                    continue  # its last token is on its way
                token_ids = () if s.coming else (s.last_token,)  # () follows the home's sample
                span = DecodeSpan(request_id=s.rid, token_ids=token_ids, position=s.position)
                s.coming += 1
            else:
                prompt = s.request.prompt_token_ids
                end = len(prompt) if budget is None else min(len(prompt), s.prefilled + budget)
                if end == s.prefilled:
                    continue  # no prompt budget left this turn
                budget = None if budget is None else budget - (end - s.prefilled)
                span = DecodeSpan(request_id=s.rid, token_ids=prompt[s.prefilled:end], position=s.prefilled)
                s.prefilled = end
                s.coming += end == len(prompt)  # the home samples its first token
            s.position = span.end
            s.in_flight += 1
            homes.setdefault(s.home.name, []).append((s, span))
        return homes

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
            seq.cached = {n: 0 for n in seq.members}
            home = choose_home(seq.members, self._homes(), {})
            if prefill_at_home(len(seq.request.prompt_token_ids), self.settings.home_prefill_max, len(agents),
                               self.unheld_read_s(home)):
                seq.at_home, seq.home = True, seq.runner.agents[home]
                seq.members, seq.sources_released = [home], True
            self.running.append(seq)
            if seq.request.on_admitted is not None:
                seq.request.on_admitted()

    def _homes(self) -> dict[NodeId, int]:
        """Requests with a home, per home agent."""
        homes: dict[NodeId, int] = {}
        for s in self.running:
            if s.home is not None:
                homes[s.home.name] = homes.get(s.home.name, 0) + 1
        return homes

    async def _open(self, seq: _Seq) -> None:
        """A cache on the home of a request it prefills itself."""
        assert seq.home is not None
        prompt = len(seq.request.prompt_token_ids)
        try:
            await seq.home.adopt_kv(seq.rid, prompt + seq.request.sampling.max_tokens - 1, prompt, [],
                                    prefill_here=True, sampling=seq.request.sampling,
                                    generator_state=generator_state(seq.generator))
            seq.opened = True
        except Exception as exc:
            log.error("request %s failed opening its cache on %s: %s", seq.rid, seq.home.name, exc)
            self._finish(seq, exc)

    async def _prefill(self, seq: _Seq, chunked: bool) -> int:
        """One sequence-parallel prefill step; returns the prompt tokens it ran."""
        assert seq.runner is not None
        prompt = seq.request.prompt_token_ids
        start = seq.prefilled
        end = min(len(prompt), start + self.settings.prefill_chunk) if chunked else len(prompt)
        part = self.policy.partition(prompt[start:end], seq.members)
        plan = chunk_step(part, start, seq.steps, seq.cached)
        try:
            logits = await seq.runner.run_step(seq.rid, plan)
            seq.cached, seq.steps, seq.prefilled = after_step(plan), seq.steps + 1, end
            if end < len(prompt):
                return end - start
            event = self._emit(seq, sample(logits[-1], seq.request.sampling, seq.generator))
            self._flush()  # the first token goes out now, not after the home has adopted the K/V
            if not self._done(seq, event):
                await self._adopt(seq, event.token_id)
        except Exception as exc:  # reaches the client; nothing is lost silently
            log.error("request %s failed in prefill: %s", seq.rid, exc)
            self._finish(seq, exc)
        return end - start

    async def _adopt(self, seq: _Seq, token: int) -> None:
        """Choose the request's home and have it gather the prompt's K/V."""
        assert seq.runner is not None
        prompt = len(seq.request.prompt_token_ids)
        home = seq.runner.agents[choose_home(seq.members, self._homes(), seq.cached)]
        sources = [(n, seq.runner.agents[n].spec.address) for n in seq.members if n != home.name and seq.cached.get(n)]
        await home.adopt_kv(seq.rid, prompt + seq.request.sampling.max_tokens - 1, prompt, sources,
                            sampling=seq.request.sampling, generator_state=generator_state(seq.generator))
        seq.home, seq.last_token, seq.position = home, token, prompt
        if self.on_prefilled is not None:
            await self.on_prefilled()

    def _send(self, home: NodeId, group: list[tuple[_Seq, DecodeSpan]]) -> asyncio.Future[bool]:
        """A home's step, sent now; its reply is handled after the reply of the home's step before
        (`_decode`)."""
        step = asyncio.ensure_future(self._decode(group, self._last_step.get(home)))
        self._last_step[home] = step
        return step

    async def _decode(self, group: list[tuple[_Seq, DecodeSpan]], after: asyncio.Future[bool] | None = None) -> bool:
        """One step of the requests homed on one agent (a token each, or a chunk of a prompt);
        returns whether a prompt prefilled there got done. Its reply is handled once the reply of
        `after` (the home's step before) is: two replies in flight may come back in either order,
        and a request's tokens must reach its consumer in the order they were sampled."""
        home = group[0][0].home
        assert home is not None
        try:
            result: DecodeResult | None = await home.decode_step([span for _, span in group])
        except Exception as exc:
            log.error("decode step on %s failed: %s", home.name, exc)
            result, error = None, exc
        if after is not None and not after.done():
            await asyncio.wait([after])
        prompts_done = False
        for i, (s, span) in enumerate(group):
            s.in_flight -= 1
            token = None if result is None else result.tokens[i]
            if result is None:
                s.coming = 0
                if not s.ended:
                    self._finish(s, error)
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
            prompts_done |= span.position < len(s.request.prompt_token_ids)
            self._emit(s, token)
            s.last_token = token.token_id
            self._done(s, token)
        return prompts_done

    # Ends ----------------------------------------------------------------------------------------

    def _emit(self, seq: _Seq, event: TokenEvent) -> TokenEvent:
        seq.produced += 1
        self._outbox.append((seq, event))
        return event

    def _flush(self) -> None:
        """Hand the consumers what was sampled (or ended) since the last flush, in order."""
        for seq, item in self._outbox:
            seq.out.put_nowait(item)
        self._outbox.clear()

    def _done(self, seq: _Seq, event: TokenEvent) -> bool:
        """End the request after a stop token or its last token; returns whether it ended."""
        if event.is_stop or seq.produced >= seq.request.sampling.max_tokens:
            self._finish(seq, None)
            return True
        return False

    def _finish(self, seq: _Seq, error: BaseException | None) -> None:
        """Out of the loop; its consumer hears the end (or the error); every agent holding its
        state releases it in the background, once no step with it is in flight."""
        if seq in self.running:
            self.running.remove(seq)
        self._outbox.append((seq, error))
        seq.ended = True
        self._release_ended(seq)

    def _release_ended(self, seq: _Seq) -> None:
        if seq.in_flight or seq.released:
            return  # the home still runs a step with it (its reply comes back here), or done
        seq.released = True
        if seq.runner is None:
            seq.gone.set()
            return
        task = self._release(seq, seq.members)
        task.add_done_callback(lambda _: seq.gone.set())

    def _release(self, seq: _Seq, nodes: Sequence[NodeId]) -> asyncio.Task[None]:
        assert seq.runner is not None
        task = asyncio.create_task(seq.runner.release(seq.rid, list(nodes)))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return task
