"""The home's decode prefetch on a real expert buffer over a generated checkpoint: a prompt's
counts, the plan read at its end within the free memory, hits and misses of its decode tokens."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from node_agent.decode_prefetch import HomePrefetch
from node_agent.expert_buffer import ExpertBuffer
from node_agent.expert_store import ExpertStore
from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig
from node_agent.throttle import Throttle
from protos.ids import ExpertId


def home(model_dir: Path, experts: int) -> HomePrefetch:
    cfg = MoeConfig.load(model_dir)
    store = ExpertStore(Checkpoint(model_dir), cfg, torch.float32, Throttle(0))
    buffer = ExpertBuffer(experts * store.expert_nbytes, store.expert_nbytes, store.load, ThreadPoolExecutor(1),
                          intermediate=cfg.expert_size)
    return HomePrefetch(buffer, [i for i in range(cfg.num_layers) if cfg.is_moe(i)], cfg.num_experts)


async def test_the_prompt_s_most_chosen_experts_are_read_one_per_layer_first(qwen_tiny: Path) -> None:
    prefetch = home(qwen_tiny, 4)  # 4 slots: one holds expert 5, one stays for demand reads, 2 are free
    layers = prefetch.layers
    async with prefetch.buffer.pinned(ExpertId(layers[0], 5)):  # held already: never planned
        pass
    chosen = [torch.tensor([[5, 1], [5, 1], [2, 1]]), torch.tensor([[3, 4], [3, 0], [3, 4]]),
              torch.tensor([[6, 7], [7, -1], [6, 7]])]
    prefetch.prompt("r", [c[:2] for c in chosen])  # the prompt in two spans
    prefetch.prompt("r", [c[2:] for c in chosen])
    prefetch.prompt_done("r")
    planned = [ExpertId(layers[0], 1), ExpertId(layers[1], 3)]  # round 1, as far as the free slots go
    assert prefetch.read == 2
    async with asyncio.timeout(10):
        while sorted(prefetch.buffer.all_resident()) != sorted([ExpertId(layers[0], 5), *planned]):
            await asyncio.sleep(0.001)
    prefetch.decoded("r", [torch.tensor([[1, 5]]), torch.tensor([[3, 0]]), torch.tensor([[2, 6]])])
    assert (prefetch.hits, prefetch.misses) == (2, 3)  # 1 and 3 read; 5 held; 0, 2 and 6 neither
    prefetch.release("r")
    prefetch.decoded("r", [torch.tensor([[1, 5]])] * 3)  # released: no longer counted
    assert (prefetch.hits, prefetch.misses) == (2, 3)


async def test_switched_off_it_counts_and_reads_nothing(qwen_tiny: Path) -> None:
    prefetch = home(qwen_tiny, 4)
    prefetch.enabled = False
    prefetch.prompt("r", [torch.tensor([[1, 2]])] * len(prefetch.layers))
    prefetch.prompt_done("r")
    prefetch.decoded("r", [torch.tensor([[1, 2]])] * len(prefetch.layers))
    assert (prefetch.read, prefetch.hits, prefetch.misses) == (0, 0, 0) and prefetch.buffer.all_loading() == []


async def test_it_never_evicts_a_whole_expert_only_slices(qwen_tiny: Path) -> None:
    prefetch = home(qwen_tiny, 4)
    layer = prefetch.layers[0]
    for e in range(4):  # memory full of whole experts: each may be the pool's one copy
        async with prefetch.buffer.pinned(ExpertId(layer, e)):
            pass
    prefetch.prompt("r", [torch.tensor([[6, 7]])] * len(prefetch.layers))
    prefetch.prompt_done("r")
    assert prefetch.read == 0 and prefetch.buffer.all_resident() == [ExpertId(layer, e) for e in range(4)]
    evicted = await prefetch.buffer.prefetch(ExpertId(layer, 6), evict_whole=False)
    assert not evicted and prefetch.buffer.counters.evictions == 0
