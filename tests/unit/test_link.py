"""The emulated link: a message arrives its latency after its bytes, latencies overlap while bytes
queue, and received bytes are paced apart from sent ones (full duplex).

Timings are lower bounds wherever they can be; the upper bounds only tell "overlapped" from
"one after another", with most of the difference as slack for a busy host.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import pytest
import torch

from node_agent.peers import Link
from protos.convert import tensor_to_proto

LATENCY_S = 0.2


async def timed(*messages: Awaitable[None]) -> float:
    start = time.monotonic()
    await asyncio.gather(*messages)
    return time.monotonic() - start


async def test_a_message_arrives_no_earlier_than_the_latency_even_without_tensor_bytes() -> None:
    link = Link(0, LATENCY_S)
    assert await timed(link.request()) >= LATENCY_S
    assert await timed(link.request(tensor_to_proto(torch.zeros(10)))) >= LATENCY_S
    assert link.bytes_sent == 40


async def test_messages_sent_together_overlap_their_latency() -> None:
    link = Link(0, LATENCY_S)
    elapsed = await timed(link.request(), link.request())
    assert LATENCY_S <= elapsed < 1.8 * LATENCY_S  # one after the other would be 2 L


async def test_bytes_queue_but_the_latency_comes_on_top_once_per_message() -> None:
    latency_s = 0.4
    link = Link(2_000_000, latency_s)  # 2 MB/s: 200 kB take 0.1 s
    t = tensor_to_proto(torch.zeros(50_000))  # 200 kB
    elapsed = await timed(link.request(t), link.request(t))
    # Bytes one after the other (0.2 s), then the last one's latency: 0.6 s; 2 x (0.1 + 0.4) if serial.
    assert 0.2 + latency_s <= elapsed < 0.9


async def test_receiving_is_paced_apart_from_sending() -> None:
    link = Link(2_000_000)  # 2 MB/s each way
    t = tensor_to_proto(torch.zeros(100_000))  # 400 kB: 0.2 s
    # One message was arriving while its sender paced it out; three converging on this
    # downlink queue behind each other: the last waits for the two before it.
    assert await timed(link.receive(t), link.receive(t), link.receive(t)) >= 2 * 0.2
    elapsed = await timed(link.send(t), link.receive(t))
    assert 0.2 <= elapsed < 1.8 * 0.2  # full duplex: sending does not slow receiving
    assert (link.bytes_sent, link.bytes_received) == (400_000, 1_600_000)


async def test_receiving_and_replying_add_no_latency() -> None:
    # A reply's latency is added once, by the server's interceptor; `send` and `receive` only pace bytes.
    link = Link(0, 10.0)
    t = tensor_to_proto(torch.zeros(10))
    assert await timed(link.send(t), link.receive(t)) < 5.0


def test_negative_latency_is_refused() -> None:
    with pytest.raises(ValueError, match="-0.5"):
        Link(0, -0.5)
