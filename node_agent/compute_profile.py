"""What one device's compute is like, measured or ruled at start: the FLOP/s of an expert's
matmuls (for the scheduler's cost model) and the torch threads of a decode step."""

from __future__ import annotations

import statistics
import time

import torch

from node_agent.model.config import MoeConfig


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


# A projection smaller than this runs a decode token on one thread (see decode_threads).
SMALL_PROJECTION_BYTES = 16 << 20


def decode_threads(cfg: MoeConfig, dtype: torch.dtype, threads: int) -> int:
    """How many torch threads a decode step's jobs use. A decode token's matmuls are
    matrix-vector products; with small experts, splitting each over threads costs more than it
    gains: on this project's 2-core CPU with the bench model (1.5 MB projections), an in-process
    decode step took 12.4 ms on one thread and 15.1 ms on two (4 requests batched: 17.7 against
    28.1 ms). Qwen3-30B-A3B's projections are 3 MB in bfloat16; Mixtral's, 117 MB, need every
    core. A micro-benchmark of one expert alone could not tell the two apart, so this is a rule
    by size rather than a measurement at start."""
    one = cfg.expert_size * cfg.hidden_size * torch.empty((), dtype=dtype).element_size()
    return 1 if one < SMALL_PROJECTION_BYTES else threads
