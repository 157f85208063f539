"""The state of continuous batching: its settings, and one request in the loop (`Seq`: where its
state lives, how far it has got, which run it is on). The loop itself is in batching.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from scheduler.client import AgentClient
from scheduler.runner import RequestRunner
from scheduler.types import GenerationRequest, NodeId, TokenEvent


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
    at_home: bool = False  # its home prefills the prompt in decode steps (else sequence-parallel)
    opened: bool = False  # at_home: the home has its cache (AdoptKV)
    opening: bool = False  # at_home: its AdoptKV is on its way
    home: AgentClient | None = None  # set once it decodes (at_home: once admitted)
    last_token: int = -1  # the last token sampled (the next span feeds it unless it is still coming)
    position: int = 0  # where its next span starts
    coming: int = 0  # tokens steps in flight will sample
    in_flight: int = 0  # steps in flight that include it
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
