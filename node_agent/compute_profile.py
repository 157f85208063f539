"""What one device's compute is like, measured at start: the FLOP/s of an expert's matmuls (for
the scheduler's cost model), on the thread and torch threads the agent computes with; and that
thread (`ComputeThread`)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from node_agent.grouped import QueuedJobs
from node_agent.model.config import MoeConfig
from node_agent.throttle import ComputePacer

R = TypeVar("R")


def measure_expert_flops(cfg: MoeConfig, dtype: torch.dtype, tokens: int = 256, compute_share: float = 0) -> float:
    """FLOP/s of one expert's matmuls on this device, for the scheduler's cost model (~0.15 s).

    A paced agent (compute_share > 0) counts its thread's CPU time, which other processes on
    the host do not inflate, and scales it by its share. The median of many single matmuls is
    taken after a warm-up: agents start together, and a mean over the first calls let start-up
    noise (a preempted call resumes with cold caches) make identical devices differ by 20%,
    which the token scheduler then turned into imbalance."""
    clock = time.thread_time if compute_share else time.perf_counter
    gate = torch.randn(cfg.expert_size, cfg.hidden_size, dtype=dtype)
    x = torch.randn(tokens, cfg.hidden_size, dtype=dtype)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(5):
            torch.nn.functional.linear(x, gate)
        start = clock()
        while clock() - start < 0.1 or len(times) < 9:
            t = clock()
            torch.nn.functional.linear(x, gate)
            times.append(clock() - t)
    return 2.0 * tokens * cfg.expert_size * cfg.hidden_size / statistics.median(times) * (compute_share or 1.0)


def set_thread_torch_threads(n: int) -> None:
    """Give the calling thread n torch threads, for good (a thread pool's initializer). torch
    sets a thread's count on the thread's first parallel op, from whatever `set_num_threads`
    any thread called last; that first op is done here, so a later call elsewhere (the disk
    thread's 1) does not reset this thread's count."""
    torch.get_num_threads()
    torch.set_num_threads(n)


class ComputeThread:
    """The agent's one compute thread: all its torch work runs there (torch releases the GIL
    inside its kernels), the only thread with `torch_threads` torch threads (see service.serve)."""

    def __init__(self, pacer: ComputePacer, torch_threads: int) -> None:
        self.pacer = pacer
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="compute", initializer=set_thread_torch_threads,
                                       initargs=(torch_threads,))
        self.queued = QueuedJobs()  # jobs waiting for the thread (a grouped pass lets them in between experts)

    async def run(self, fn: Callable[..., R], *args: object) -> R:
        """fn(*args) on the thread, paced to the emulated device's speed where the profile sets
        one; counted while queued."""
        def run() -> R:
            self.queued.add(-1)
            with torch.inference_mode(), self.pacer.pace():
                return fn(*args)

        self.queued.add(1)
        job = self.pool.submit(run)
        try:
            return await asyncio.wrap_future(job)
        finally:
            if job.cancelled():  # never began
                self.queued.add(-1)

    async def unpaced(self, fn: Callable[..., R], *args: object) -> R:
        """fn(*args) on the thread, outside the pacer (start-up measurements)."""
        return await asyncio.wrap_future(self.pool.submit(fn, *args))
