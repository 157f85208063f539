"""The state of continuous batching: its settings, one request in the loop (`Seq`: where its
state lives, how far it has got, which run it is on), and the span each request sends its home
next (`next_spans`). The loop itself is in batching.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from scheduler.client import AgentClient
from scheduler.runner import RequestRunner
from scheduler.types import DecodeSpan, GenerationRequest, NodeId, TokenEvent


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
class Seq:
    """One request in the loop: where its state lives and how far it has got."""

    request: GenerationRequest  # its sampling seed is always set (request_seed)
    out: asyncio.Queue[TokenEvent | BaseException | None] = field(default_factory=asyncio.Queue)
    runner: RequestRunner | None = None  # the agents it was admitted on (its prefill members)
    members: list[NodeId] = field(default_factory=list)  # agents holding its state, to release
    prefilled: int = 0  # prompt tokens through prefill so far
    steps: int = 0  # prefill steps run (StepPlan.step of the next one)
    cached: dict[NodeId, int] = field(default_factory=dict)  # K/V rows each agent holds
    counts: list[int] = field(default_factory=list)  # its prefill's selections per (MoE layer, expert), flat
    at_home: bool = False  # its home prefills the prompt in decode steps (else sequence-parallel)
    opened: bool = False  # at_home: the home has its cache (AdoptKV)
    opening: bool = False  # at_home: its AdoptKV is on its way
    home: AgentClient | None = None  # set once it decodes (at_home: once admitted)
    last_token: int = -1  # the last token sampled (the next span feeds it unless it is still coming)
    position: int = 0  # where its next span starts
    coming: int = 0  # tokens steps in flight will sample
    in_flight: int = 0  # calls in flight that include it: steps, and the AdoptKV opening its cache
    sources_released: bool = False  # the other agents dropped its prompt K/V (the home has it)
    cancelled: bool = False  # the consumer left
    ended: bool = False  # out of the loop; released once no step with it is in flight
    released: bool = False  # its release is under way
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # out of the loop and released
    tokens: list[int] = field(default_factory=list)  # the token ids handed to the consumer
    replayed: tuple[int, ...] = ()  # tokens produced before its last replay, now part of its prompt
    epoch: int = 0  # replays so far: steps of an earlier run are ignored when they come back
    admitted: bool = False  # on_admitted has been told

    @property
    def rid(self) -> str:
        """Its id on the agents: a replay runs under a new one."""
        return self.request.request_id if not self.epoch else f"{self.request.request_id}~replay{self.epoch}"

    @property
    def produced(self) -> int:
        """Tokens sampled and handed to the consumer."""
        return len(self.tokens)

    @property
    def prompt(self) -> tuple[int, ...]:
        """What its run prefills: the request's prompt, and after a replay the tokens produced."""
        return self.request.prompt_token_ids + self.replayed

    @property
    def generating(self) -> bool:
        """Its whole prompt is sent: its next steps decode tokens."""
        return self.home is not None and self.prefilled == len(self.prompt)

    def begin_replay(self) -> None:
        """A new run of the request (a new id on the agents): the tokens it produced join its
        prompt, and every trace of where the old run's state lives is dropped."""
        self.epoch += 1
        self.replayed = tuple(self.tokens)
        self.runner, self.members, self.cached, self.home = None, [], {}, None
        self.prefilled = self.steps = self.position = self.coming = 0
        self.at_home = self.opened = self.opening = self.sources_released = False


def next_spans(running: list[Seq], budget: int | None, busy: frozenset[NodeId] = frozenset()
               ) -> dict[NodeId, list[tuple[Seq, DecodeSpan, int]]]:
    """A turn's span of every running request that has one, by home (none on the `busy` homes):
    its next token (the one its last step is sampling, if that step is still in flight), or
    its prompt's next chunk within `budget` prompt tokens (None: no limit).

    A home where nothing decodes yet waits until every prompt admitted to it has its cache open:
    prompts that arrive together (a few ms apart, each opening its cache with its own AdoptKV)
    are then prefilled in one step. Sent as each cache opened, the first went alone and the
    others waited for it: 8 LAN streams got their first tokens at 0.21, 0.65 and 0.97 s, and
    together all at 0.73-0.77 s; 4 at 0.20 and 0.56 s, together at 0.43 s."""
    opening = {s.home.name for s in running if s.home is not None and s.at_home and not s.opened and not s.cancelled}
    busy = busy | (opening - {s.home.name for s in running if s.home is not None and s.generating})
    homes: dict[NodeId, list[tuple[Seq, DecodeSpan, int]]] = {}
    for s in running:
        if s.home is None or s.cancelled or (s.at_home and not s.opened) or s.home.name in busy:
            continue
        if s.generating:
            if s.produced + s.coming >= s.request.sampling.max_tokens:
                continue  # its last token is on its way
            token_ids = () if s.coming else (s.last_token,)  # () follows the home's sample
            span = DecodeSpan(request_id=s.rid, token_ids=token_ids, position=s.position)
            s.coming += 1
        else:
            prompt = s.prompt
            end = len(prompt) if budget is None else min(len(prompt), s.prefilled + budget)
            if end == s.prefilled:
                continue  # no prompt budget left this turn
            budget = None if budget is None else budget - (end - s.prefilled)
            span = DecodeSpan(request_id=s.rid, token_ids=prompt[s.prefilled:end], position=s.prefilled)
            s.prefilled = end
            s.coming += end == len(prompt)  # the home samples its first token
        s.position = span.end
        s.in_flight += 1
        homes.setdefault(s.home.name, []).append((s, span, s.epoch))
    return homes


class PrefetchTally:
    """Decode selections against the pool-wide decode prefetch's plans (experts as flat indices,
    MoE layer * experts + index): a hit is a selection of an expert a plan had read, a miss one
    of an expert that no agent held when planned and no plan read (a read on demand), as the
    home's own prefetch counts them (node_agent/decode_prefetch.py)."""

    def __init__(self) -> None:
        self.experts = 0  # per MoE layer
        self.read: frozenset[int] = frozenset()
        self.unheld: frozenset[int] = frozenset()
        self.hits = 0
        self.misses = 0

    @property
    def planned(self) -> bool:
        return self.experts > 0

    def plan(self, experts: int, read: frozenset[int], unheld: frozenset[int]) -> None:
        self.experts = experts
        self.read |= read
        self.unheld = (self.unheld | unheld) - self.read

    def decoded(self, ids: torch.Tensor) -> None:
        """A decode token's selections [MoE layers, 1, k] (expert ids, -1 for none)."""
        flat = ids.long() + torch.arange(ids.shape[0])[:, None, None] * self.experts
        for f in flat[ids >= 0].tolist():
            self.hits += f in self.read
            self.misses += f in self.unheld


def count_prompts(group: Sequence[tuple[Seq, DecodeSpan, int]], selections: torch.Tensor, tally: PrefetchTally) -> None:
    """A home step's selections [MoE layers, rows, k], span by span: a prompt span's rows are added
    to its request's counts (as a sequence-parallel prefill's are; the decode prefetch ranks
    experts by them), a decode token's are judged against the prefetch's plans."""
    if selections.dim() != 3:
        return
    row, L = 0, selections.shape[0]
    for s, span, epoch in group:
        rows = span.end - span.position
        prompt_rows = max(0, min(span.end, len(s.prompt)) - span.position)
        if not prompt_rows and span.token_ids and tally.planned:
            tally.decoded(selections[:, row:row + rows])
        E = len(s.counts) // L if L else 0
        if prompt_rows and epoch == s.epoch and E and L * E == len(s.counts):
            ids = selections[:, row:row + prompt_rows].long()
            flat = ids + torch.arange(L)[:, None, None] * E
            summed = torch.bincount(flat[(ids >= 0) & (ids < E)], minlength=L * E)
            s.counts = [a + b for a, b in zip(s.counts, summed.tolist())]
        row += rows
