"""A batching turn's spans (`batch_state.next_spans`): prompts that arrive together on a home
where nothing decodes yet are prefilled in one step, once every one of them has its cache open;
a home that decodes never waits for a cache still opening."""

from __future__ import annotations

import pytest

from protos.ids import RequestId
from scheduler.batch_state import Seq, next_spans
from scheduler.client import AgentClient
from scheduler.types import GenerationRequest, NodeId, NodeSpec, SamplingParams


@pytest.fixture
async def homes() -> list[AgentClient]:
    # Clients of agents that never run: next_spans only reads their names (nothing is called).
    clients = [AgentClient(NodeSpec(NodeId(name), f"127.0.0.1:{port}")) for name, port in (("a", 1), ("b", 2))]
    yield clients
    for c in clients:
        await c.close()


def _at_home(rid: str, home: AgentClient, prompt: int = 5, opened: bool = True) -> Seq:
    request = GenerationRequest(RequestId(rid), tuple(range(1, prompt + 1)), SamplingParams(max_tokens=4))
    return Seq(request, home=home, at_home=True, opened=opened, opening=not opened, members=[home.name])


def _decoding(rid: str, home: AgentClient) -> Seq:
    s = _at_home(rid, home)
    s.prefilled = s.position = len(s.prompt)
    s.last_token = 7
    return s


async def test_a_home_that_decodes_nothing_waits_for_every_prompt_s_cache(homes: list[AgentClient]) -> None:
    a, _ = homes
    first, second = _at_home("r1", a), _at_home("r2", a, opened=False)
    assert next_spans([first, second], None) == {}
    assert first.prefilled == 0  # nothing was taken from its prompt
    second.opened, second.opening = True, False
    step = next_spans([first, second], None)
    assert [(s.rid, span.position, len(span.token_ids)) for s, span, _ in step[a.name]] == [("r1", 0, 5), ("r2", 0, 5)]


async def test_a_decoding_home_goes_on_and_other_homes_are_not_held(homes: list[AgentClient]) -> None:
    a, b = homes
    decoding, opening, elsewhere = _decoding("r1", a), _at_home("r2", a, opened=False), _at_home("r3", b)
    step = next_spans([decoding, opening, elsewhere], None)
    assert [s.rid for s, _, _ in step[a.name]] == ["r1"]  # its next token; r2 joins once open
    assert [s.rid for s, _, _ in step[b.name]] == ["r3"]
    waiting = _at_home("r4", b, opened=False)
    again = next_spans([_at_home("r5", b), waiting], None)
    assert b.name not in again  # b decodes nothing: it waits for r4


async def test_a_cancelled_prompt_still_opening_holds_nothing_back(homes: list[AgentClient]) -> None:
    a, _ = homes
    gone = _at_home("r2", a, opened=False)
    gone.cancelled = True
    step = next_spans([_at_home("r1", a), gone], None)
    assert [s.rid for s, _, _ in step[a.name]] == ["r1"]
