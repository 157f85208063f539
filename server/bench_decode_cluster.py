"""The decode bench's clusters: `potluck up` in a child process, driven over HTTP only.

    DecodeRun (what every case of a run shares) -> DecodeCluster(run, agents, memory, link, ...)
    -> stream / streams (StreamTiming), settle (no reads, no request running), settled_counters
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import httpx
import yaml

from server.bench_decode_stats import Arrival, DecodeCounters, StreamTiming, activity, counters_settled, tokens_in_chunk
from server.bench_prefill import NO_REPLAN_S, wait_healthy
from server.launcher import die_with_parent, free_ports, stop_process

LINK = "1Gbit/s"
SETTLE_POLL_S = 1.0  # /metrics scrapes this far apart must agree before a timed request
SETTLE_TIMEOUT_S = 300.0
COUNTERS_POLL_S = 0.25  # /metrics scrapes this far apart while waiting for the decode counters
COUNTERS_TIMEOUT_S = 30.0  # past this the counters count as unsettled: round trips are n/a


@dataclass(frozen=True)
class DecodeRun:
    """What every case of one run shares."""

    model_dir: Path
    workdir: Path  # the clusters' inventories
    threads: int  # torch intra-op threads of transformers and of each compute-bound agent
    lan_threads: int  # torch threads of each LAN agent (a fair share of the host's cores)
    gen_tokens: int  # max_tokens of every request
    warmup: list[int]  # the warm-up prompt, token ids
    prompts: list[list[int]]  # one timed prompt per round
    stream_prompts: list[list[list[int]]]  # per round, one prompt per stream (for the most streams)
    lan_memory: int  # expert memory of each LAN agent, bytes
    lan_latency_s: float  # one-way link latency of the LAN agents, seconds; 0: none
    io_disk: float = 200e6  # disk rate of each I/O-bound agent, bytes/s
    io_pool: int = 0  # expert memory of the I/O-bound agents together, bytes (half the experts)
    lan_disk: float = 50e6  # disk rate of each agent of the lan-disk case, bytes/s


class UpCluster:
    """`potluck up` (its command `cmd`, serving at `url`) in a child process, driven over HTTP
    only; subclasses build the command."""

    cmd: list[str]
    url: str
    http: httpx.AsyncClient
    proc: subprocess.Popen[bytes] | None

    async def __aenter__(self) -> Self:
        # Killed outright, the bench takes its cluster with it (`potluck up` in turn takes its agents).
        self.proc = subprocess.Popen(self.cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=die_with_parent)
        await wait_healthy(self.proc, self.cmd, self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        if self.proc is not None:
            stop_process(self.proc)


class DecodeCluster(UpCluster):
    """`potluck up --inventory` for the decode cases."""

    def __init__(self, run: DecodeRun, agents: int, memory: int = 0, link: str | None = None,
                 latency_s: float = 0.0, max_running: int = 1, threads: int | None = None,
                 disk: float | Sequence[float] = 0.0,
                 expert_split: str = "auto", decode_prefetch: bool = True, load_balance: bool = True) -> None:
        self.port, *ports = free_ports(agents + 1)
        nodes = []
        for i, port in enumerate(ports):
            node: dict[str, object] = {"name": f"agent{i}", "address": f"127.0.0.1:{port}",
                                       "expert_memory": memory or "unlimited",
                                       "torch_threads": threads or run.threads}
            if link:
                node["link_bandwidth"] = link
            rate = disk if isinstance(disk, (int, float)) else disk[i]  # each agent's own, or one for all
            if rate:
                node["disk_bandwidth"] = rate
            if latency_s:
                node["link_latency"] = f"{latency_s * 1e6:.0f}us"
            nodes.append(node)
        inventory = run.workdir / f"inventory-{self.port}.yaml"
        inventory.write_text(yaml.safe_dump({"nodes": nodes}, sort_keys=False))
        self.cmd = [sys.executable, "-m", "server.cli", "up", "--inventory", str(inventory), "--model",
                    str(run.model_dir), "--port", str(self.port), "--served-model-name", "bench", "--max-running",
                    str(max_running), "--log-level", "WARNING", "--expert-split", expert_split,
                    *([] if decode_prefetch else ["--no-decode-prefetch"]),
                    *([] if load_balance else ["--no-load-balance"]),
                    "--replan-every", str(NO_REPLAN_S)]  # placement is not what this measures  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.AsyncClient(timeout=600)

    async def stream(self, prompt: list[int], max_tokens: int) -> StreamTiming:
        body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0,
                "logprobs": 0, "ignore_eos": True}
        arrivals, finish = [], None
        sent = time.perf_counter()
        async with self.http.stream("POST", f"{self.url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"bench request failed: {response.status_code} {(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                at, chunk = time.perf_counter(), json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    raise RuntimeError(f"the stream failed: {chunk['error']}")
                if tokens := tokens_in_chunk(chunk):
                    arrivals.append(Arrival(at, tokens))
                finish = next((c["finish_reason"] for c in chunk.get("choices", []) if c.get("finish_reason")), finish)
        return StreamTiming(sent, tuple(arrivals), finish)

    async def streams(self, prompts: list[list[int]], max_tokens: int) -> list[StreamTiming]:
        return list(await asyncio.gather(*(self.stream(p, max_tokens) for p in prompts)))

    async def metrics(self) -> str:
        response = await self.http.get(f"{self.url}/metrics")
        response.raise_for_status()
        return response.text

    async def counters(self) -> DecodeCounters:
        return DecodeCounters.from_metrics(await self.metrics())

    async def settled_counters(self, before: DecodeCounters | None = None,
                               expected_tokens: int | None = None) -> DecodeCounters | None:
        """The decode counters once they hold every step run so far (`counters_settled`: the
        `expected_tokens` decoded since `before`, or no change across a server refresh); None if
        they do not settle within COUNTERS_TIMEOUT_S."""
        start = time.monotonic()
        last, since = await self.counters(), start
        while not counters_settled(before, last, expected_tokens, time.monotonic() - since):
            if time.monotonic() - start > COUNTERS_TIMEOUT_S:
                return None
            await asyncio.sleep(COUNTERS_POLL_S)
            now = await self.counters()
            if now != last:
                last, since = now, time.monotonic()
        return last

    async def settle(self) -> None:
        """Until the agents stop reading experts (fills after a request) and no request runs."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        last = activity(await self.metrics())
        while time.monotonic() < deadline:
            await asyncio.sleep(SETTLE_POLL_S)
            now = activity(await self.metrics())
            if now == last and not now[-1]:
                return
            last = now
        raise RuntimeError(f"the cluster was still busy after {SETTLE_TIMEOUT_S:.0f} s")
