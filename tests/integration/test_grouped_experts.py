"""Expert batches that reach an agent while its compute thread is busy run as one grouped pass,
formed when the thread is free, and batches that arrive while a pass runs join it; either way
with the same result as one pass each. An owner's early run (its own batch, begun before the
plan) unpins its experts however it ends."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from node_agent.expert_buffer import ExpertBuffer
from node_agent.expert_store import ExpertStore
from node_agent.model import moe, slots
from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig
from node_agent.peers import GrpcPeers, Link
from node_agent.throttle import ComputePacer, Throttle
from node_agent.worker import AgentCore
from protos.ids import ExpertId


def _agent(model: Path, pacer: ComputePacer | None = None, slots: int = 0
           ) -> tuple[MoeConfig, ExpertStore, ExpertBuffer, AgentCore]:
    """A real agent core on the tiny checkpoint, with no peers and expert memory for `slots`
    experts (0: unlimited)."""
    cfg = MoeConfig.load(model)
    ckpt = Checkpoint(model)
    store = ExpertStore(ckpt, cfg, torch.float32, Throttle(0))
    buffer = ExpertBuffer(slots * store.expert_nbytes, store.expert_nbytes, store.load, ThreadPoolExecutor(1))
    core = AgentCore("a", cfg, moe.load_dense(ckpt, cfg, torch.float32), buffer, GrpcPeers("a", Link(0)), pacer=pacer)
    return cfg, store, buffer, core


class HeldAfterFirstWork(ComputePacer):
    """A paced agent's pacer (so that expert batches run as grouped passes on the compute thread)
    that holds the thread after the first work it paces (a pass's first expert) until `resume`.
    Holding in the pacer's sleep instead was flaky on a busy host: work that overran its budget
    sleeps not at all, so the hold came after a later expert."""

    def __init__(self) -> None:
        super().__init__(0.1)
        self.first_step, self.resume = threading.Event(), threading.Event()

    @contextlib.contextmanager
    def pace(self) -> Iterator[None]:
        yield
        if not self.first_step.is_set():
            self.first_step.set()
            self.resume.wait(10)


async def test_batches_arriving_together_share_one_pass(qwen_tiny: Path) -> None:
    cfg, store, buffer, core = _agent(qwen_tiny)
    layer, half = 0, cfg.num_experts // 2
    weights = {e: await buffer.acquire(ExpertId(layer, e)) for e in range(half)}  # resident; one is not
    g = torch.Generator().manual_seed(3)
    batches = []
    for rows in (5, 9, 3):
        ids = torch.randint(0, half + 1, (rows, cfg.top_k), generator=g)  # expert `half` must be loaded
        ids[0, 0] = -1  # a skipped slot
        batches.append((torch.randn(rows, cfg.hidden_size, generator=g), ids, torch.rand(rows, cfg.top_k, generator=g)))

    taken, gate = threading.Event(), threading.Event()

    def hold() -> None:
        taken.set()
        gate.wait()

    busy = asyncio.ensure_future(core.compute(hold))
    assert await asyncio.to_thread(taken.wait, 10)  # the compute thread is taken
    running = [asyncio.ensure_future(core.executor.execute(layer, *b)) for b in batches]
    for _ in range(10_000):  # the owners' batches queue while it is taken
        if core.passes.queued == len(batches):
            break
        await asyncio.sleep(0.001)
    assert core.passes.formed == 0  # no pass is formed while the compute thread is taken
    gate.set()
    outs = await asyncio.gather(*running)
    await busy

    assert core.passes.formed == 1  # three owners' resident experts, one pass
    for (x, ids, w), out in zip(batches, outs):
        expected = slots.run_experts(x, ids, w, lambda e: weights.get(e) or store.load(ExpertId(layer, e)))
        assert torch.allclose(out, expected, atol=1e-6)


async def test_a_batch_arriving_while_a_pass_runs_joins_it(qwen_tiny: Path) -> None:
    pacer = HeldAfterFirstWork()
    first_step, resume = pacer.first_step, pacer.resume
    cfg, _, buffer, core = _agent(qwen_tiny, pacer)
    layer = 0
    weights = {e: await buffer.acquire(ExpertId(layer, e)) for e in range(4)}  # resident
    g = torch.Generator().manual_seed(5)
    # Both owners' tokens use experts 0-3; the first owner's use expert 0 most, so it runs first.
    ids_a = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1], [2, 0]])
    ids_b = torch.tensor([[3, 0], [1, 2], [2, 3], [-1, 1]])
    batches = [(torch.randn(len(ids), cfg.hidden_size, generator=g), ids, torch.rand(len(ids), cfg.top_k, generator=g))
               for ids in (ids_a, ids_b)]

    a = asyncio.ensure_future(core.executor.execute(layer, *batches[0]))
    assert await asyncio.to_thread(first_step.wait, 10)  # expert 0 ran for the first owner
    b = asyncio.ensure_future(core.executor.execute(layer, *batches[1]))
    for _ in range(10_000):
        if core.passes.queued == 1:
            break
        await asyncio.sleep(0.001)
    assert core.passes.queued == 1
    resume.set()
    outs = await asyncio.gather(a, b)

    # One pass: experts 1-3 once for both owners, expert 0 again for the owner that joined late
    # (one pass each would take 4 + 4 expert matmuls).
    assert (core.passes.formed, core.passes.steps) == (1, 5)
    for (x, ids, w), out in zip(batches, outs):
        expected = slots.run_experts(x, ids, w, weights.__getitem__)
        assert torch.allclose(out, expected, atol=1e-6)


async def test_a_pass_gives_the_thread_up_to_other_work_between_experts(qwen_tiny: Path) -> None:
    """Attention or a router queued behind a pass (the agent's own chain, which its peers wait
    for) runs after the pass's current expert, not after all of them; the pass then goes on."""
    pacer = HeldAfterFirstWork()
    first_step, resume = pacer.first_step, pacer.resume
    cfg, _, buffer, core = _agent(qwen_tiny, pacer)
    layer = 0
    weights = {e: await buffer.acquire(ExpertId(layer, e)) for e in range(4)}
    ids = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [3, 2]])
    g = torch.Generator().manual_seed(7)
    batch = (torch.randn(len(ids), cfg.hidden_size, generator=g), ids, torch.rand(len(ids), cfg.top_k, generator=g))

    running = asyncio.ensure_future(core.executor.execute(layer, *batch))
    assert await asyncio.to_thread(first_step.wait, 10)  # one of the four experts has run
    other = asyncio.ensure_future(core.compute(lambda: core.passes.steps))
    await asyncio.sleep(0)  # one turn of the loop: the task submits its job, queued behind the pass
    resume.set()
    out, steps_before = await asyncio.gather(running, other)

    assert steps_before == 1  # it ran after the first expert, not after the fourth
    assert (core.passes.formed, core.passes.resumed, core.passes.steps) == (1, 1, 4)
    assert torch.allclose(out, slots.run_experts(*batch, weights.__getitem__), atol=1e-6)


async def test_an_early_run_cancelled_before_its_first_step_unpins_its_experts(qwen_tiny: Path) -> None:
    cfg, _, buffer, core = _agent(qwen_tiny, slots=2)
    layer = 0
    for e in (0, 1):  # the buffer is full, nothing pinned
        await buffer.acquire(ExpertId(layer, e))
        await buffer.release(ExpertId(layer, e))
    g = torch.Generator().manual_seed(5)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    early = core._start_early(layer, torch.randn(3, cfg.hidden_size, generator=g), ids, torch.rand(3, cfg.top_k, generator=g))
    assert early is not None and early.experts == {0, 1}
    early.out.cancel()  # before the event loop ever ran it: a request dropped in the same turn

    # Both experts are unpinned again, so a third one can take a slot.
    await asyncio.wait_for(buffer.acquire(ExpertId(layer, 2)), timeout=10)
    assert len(buffer.all_resident()) == 2
