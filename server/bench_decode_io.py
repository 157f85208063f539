"""The I/O-bound case of `potluck bench decode`: experts that must be read, whole or split.

2 and 4 agents (`--io-agents`) whose expert memory together holds half the model's experts, each
with the disk rate `--io-disk` (the report gives how many times one expert's one-token compute
reading it takes), link `1Gbit/s` with `--lan-latency`, each agent its fair share of the host's
cores. Every agent count runs each of `IO_RUNS` on a fresh cluster, the baseline first: whole
experts on demand (`--expert-split never --no-decode-prefetch`: an expert no agent holds is read
whole by the home while the others wait), split (`auto --no-load-balance`: it is split over every
agent, each reading and running 1/N of it), + the load balance (the scheduler chooses which experts
split and over whom), + the decode prefetch; then each of the three switched off alone. Inter-token time as in the
other cases, each agent's bytes read from disk over the timed rounds (the fills between rounds
included), and the prefetch's hit rate (hits / (hits + misses): the server's counters of the
pool-wide prefetch where it planned, else the agents' of the homes' own).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from node_agent.expert_store import ExpertStore
from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig
from node_agent.model.moe import swiglu
from node_agent.throttle import Throttle
from protos.human import format_rate
from protos.ids import ExpertId
from server.bench_decode_cluster import LINK, DecodeCluster, DecodeRun
from server.bench_decode_stats import decoded_tokens, metric_samples, round_trips_per_token, summarize, summed
from server.launcher import threads_per_agent

# (name, --expert-split, load balance, decode prefetch) of each run: the baseline, each part
# added in turn, then each switched off alone from all three.
IO_RUNS = (("whole", "never", True, False), ("split", "auto", False, False), ("split+balance", "auto", True, False),
           ("split+balance+prefetch", "auto", True, True), ("balance+prefetch", "never", True, True),
           ("split+prefetch", "auto", False, True))
IO_FULL = "split+balance+prefetch"
IO_WITHOUT = {"split": "balance+prefetch", "load balance": "split+prefetch", "prefetch": "split+balance"}
# Unlike disks (a LAN's tablet beside its laptops): agent i reads at this many times --io-disk.
# The first agent, the requests' home, has the slowest; these runs show what the load balance is
# for, with no target of their own.
MIXED_DISKS = (0.25, 2.0, 1.0, 0.5)
MIXED_RUNS = (("mixed-whole", "never", True, False), ("mixed-split", "auto", False, False),
              ("mixed-split+balance", "auto", True, False))
IO_FLAGS = {name: f"--expert-split {split}" + ("" if balance else " --no-load-balance")
            + ("" if prefetch else " --no-decode-prefetch") for name, split, balance, prefetch in IO_RUNS + MIXED_RUNS}
DISK_READ = "potluck_agent_disk_read_bytes_total"


def expert_token_s(model_dir: Path, threads: int = 1) -> float:
    """One expert's compute on one token here (median of many), on `threads` torch threads: what
    a disk read of the expert is compared with."""
    cfg = MoeConfig.load(model_dir)
    layer = next(i for i in range(cfg.num_layers) if cfg.is_moe(i))
    expert = ExpertStore(Checkpoint(model_dir), cfg, torch.float32, Throttle(0)).load(ExpertId(layer, 0))
    x = torch.randn(1, cfg.hidden_size)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(20):
                swiglu(expert, x)
            times = []
            for _ in range(200):
                start = time.perf_counter()
                swiglu(expert, x)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return statistics.median(times)


def read_bytes(metrics: str) -> dict[str, float]:
    """Bytes each agent has read from its disk (/metrics), by agent name."""
    return {dict(labels).get("agent", "?"): value for labels, value in metric_samples(metrics).get(DISK_READ, {}).items()}


def prefetch_counts(metrics: str) -> tuple[float, ...]:
    """(hits, misses) of the pool-wide decode prefetch (the server's), (hits, misses) of the
    homes' own (the agents', summed), and (begun, used) of the agents' read-ahead slices (0 where
    not exported)."""
    s = metric_samples(metrics)
    pool = [summed(s, f"potluck_decode_prefetch_{k}_total") or 0.0 for k in ("hits", "misses")]
    names = ("decode_prefetch_hits", "decode_prefetch_misses", "read_ahead", "read_ahead_used")
    return (*pool, *(summed(s, f"potluck_agent_{k}_total") or 0.0 for k in names))


async def run_io(run: DecodeRun, agent_counts: list[int]) -> list[dict[str, Any]]:
    """Each agent count, each mode: a fresh cluster, the same warm-up and rounds as every case."""
    from server.bench_decode import _progress  # the decode bench's progress line

    out = []
    for agents in agent_counts:
        threads = threads_per_agent(agents, os.cpu_count() or 1)
        for name, split, balance, prefetch in IO_RUNS + MIXED_RUNS:
            disk = ([run.io_disk * f for f in MIXED_DISKS[:agents]] if name.startswith("mixed-")
                    else [run.io_disk] * agents)
            async with DecodeCluster(run, agents, run.io_pool // agents, LINK, run.lan_latency_s, 1, threads,
                                     disk=disk, expert_split=split, decode_prefetch=prefetch,
                                     load_balance=balance) as cluster:  # fmt: skip
                await cluster.stream(run.warmup, run.gen_tokens)
                await cluster.settle()
                before, start = await cluster.settled_counters(), read_bytes(await cluster.metrics())
                judged = prefetch_counts(await cluster.metrics())
                rounds = []
                for prompt in run.prompts:
                    await cluster.settle()
                    rounds.append([await cluster.stream(prompt, run.gen_tokens)])
                after = await cluster.settled_counters(before, decoded_tokens(rounds))
                end = read_bytes(await cluster.metrics())
                pool_hits, pool_misses, hits, misses, begun, used = (
                    b - a for a, b in zip(judged, prefetch_counts(await cluster.metrics())))
                if pool_hits + pool_misses:  # the pool-wide prefetch planned: its rate, not the homes' own
                    hits, misses = pool_hits, pool_misses
            case = summarize(f"io-{name}", agents, 1, rounds, round_trips_per_token(before, after))
            case["prefetch_hit_rate"] = hits / (hits + misses) if prefetch and hits + misses else None
            case["read_ahead"], case["read_ahead_used"] = begun, used
            case["threads"] = threads
            case["bytes_read_per_agent"] = {a: end[a] - start.get(a, 0.0) for a in sorted(end)}
            out.append(_progress(case))
    return out


def io_settings(data: dict[str, Any]) -> list[str]:
    """The report's lines on the I/O-bound case (none if the run had none)."""
    if "io_disk" not in data or not any(c["case"].startswith("io-") for c in data["cases"]):
        return []
    ratio = data["io_expert_read_s"] / data["io_expert_token_s"]
    return [
        f"I/O-bound: agents whose expert memory together holds half the experts ({data['io_pool'] / 1e6:.0f} MB of "
        f"{data['expert_bytes_total'] / 1e6:.0f} MB), disk {format_rate(data['io_disk'])} each: reading one expert takes "
        f"{data['io_expert_read_s'] * 1e3:.1f} ms, {ratio:.0f}x its one-token compute "
        f"({data['io_expert_token_s'] * 1e3:.2f} ms on 1 thread); link {data['link']}, latency "
        f"{data['link_latency_s'] * 1e3:g} ms one way; each agent its fair share of the cores. --expert-split never: "
        "an expert no agent holds is read whole by the home; auto: it is split (each agent of the split reads and "
        "runs 1/m of it), over every agent with --no-load-balance, else where and over whom the scheduler's load "
        f"balance chooses. Mixed disks: agent i reads at {', '.join(f'{f:g}' for f in MIXED_DISKS)} times that "
        "(the first, the requests' home, slowest). The decode prefetch also reads ahead, while a request decodes, the "
        "slices of the experts its next layer's router guesses from this layer. The decode prefetch reads, before a "
        "request decodes, what its prompt chose most, into every agent's cache memory in place of experts it chose "
        "less; its hit rate is hits / (hits + misses) of the decode tokens' selections (a miss: an expert no agent "
        "held when it planned, nor read).",
        "Bytes read per agent over the timed rounds (fills between rounds included): "
        + "; ".join(f"{io_label(c)}: " + ", ".join(f"{v / 1e6:.0f}" for v in c["bytes_read_per_agent"].values())
                    + " MB" for c in data["cases"] if c["case"].startswith("io-")) + ".",
        "Prefetch hit rate: " + "; ".join(f"{io_label(c)}: {c['prefetch_hit_rate']:.0%}" for c in data["cases"]
                                         if c["case"].startswith("io-") and c.get("prefetch_hit_rate") is not None)
        + ".",
        "Slices read ahead on the next layer's guess, used / begun: "
        + "; ".join(f"{io_label(c)}: {c['read_ahead_used']:.0f} / {c['read_ahead']:.0f}" for c in data["cases"]
                    if c["case"].startswith("io-") and c.get("read_ahead")) + ".",
    ]


def io_label(case: dict[str, Any]) -> str:
    name = case["case"].removeprefix("io-")
    return f"I/O-bound, {case['agents']} agents, {name} ({IO_FLAGS.get(name, '?')})"
