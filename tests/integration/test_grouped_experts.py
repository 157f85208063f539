"""Expert batches that reach an agent while its compute thread is busy run as one grouped pass,
formed when the thread is free, with the same result as one pass each."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from node_agent.expert_buffer import ExpertBuffer
from node_agent.expert_store import ExpertStore
from node_agent.model import moe
from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig
from node_agent.peers import GrpcPeers, Link
from node_agent.throttle import Throttle
from node_agent.worker import AgentCore
from protos.ids import ExpertId


async def test_batches_arriving_together_share_one_pass(qwen_tiny: Path) -> None:
    cfg = MoeConfig.load(qwen_tiny)
    ckpt = Checkpoint(qwen_tiny)
    store = ExpertStore(ckpt, cfg, torch.float32, Throttle(0))
    buffer = ExpertBuffer(0, store.expert_nbytes, store.load, ThreadPoolExecutor(1))
    core = AgentCore("a", cfg, moe.load_dense(ckpt, cfg, torch.float32), buffer, GrpcPeers("a", Link(0)))
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
    running = [asyncio.ensure_future(core.execute(layer, *b)) for b in batches]
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
        expected = moe.run_experts(x, ids, w, lambda e: weights.get(e) or store.load(ExpertId(layer, e)))
        assert torch.allclose(out, expected, atol=1e-6)
