"""Expert placement under per-user workloads: `potluck bench placement`.

Three unlike agents (expert memory in the ratio 1:1:2, pooled memory below the model's experts,
so placement matters), link 500 Mbit/s with 1 ms latency, disks throttled. Three users, each
homed on its own agent (inventory `users:`), send streamed completions with Poisson arrivals.
Random weights have no topics, so the model is generated with `init-model --topics 3`: the
vocabulary splits into three ranges whose tokens mostly choose their own third of each layer's
experts, and each user draws its prompts from its own range. The report gives each user's
per-layer activation entropy and the overlap of the users' top experts, so the locality is shown,
not assumed.

Per placement policy, on a fresh cluster: a warm-up phase fills the activation window (each
replan sees the last phase, `--stats-window`), a replan applies the policy (POST /admin/replan),
and once every agent has its placement resident (GET /admin/placement) a measured phase gives
the mean inter-token time, TTFT and the share of expert calls that left their home. Then the
shift: the users swap workloads (each takes the next user's range); with migration a replan
follows after one phase, without (`--no-migration`) the placement stays; the latency is reported
phase by phase, and the phase after the replan includes the move. A request that fails is
counted, not raised; the targets table says how many did. `--rounds N` repeats every case on N
fresh clusters, the rounds interleaved (each policy once, then again); the report gives each
figure's median and every round's inter-token time: the same arrivals on two fresh clusters have
differed by a quarter, more than some policies differ.

Two shapes: `bench` (16 experts top-2) and `many` (64 experts top-6, as DeepSeek-V2-Lite). The
report (targets, Markdown, PNG) is `bench_placement_report.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig
from node_agent.model.synth import TOPIC_VERSION, init_model, topic_ranges
from server.bench_decode_cluster import UpCluster
from server.bench_decode_stats import metric_samples, summed, tokens_in_chunk
from server.bench_placement_report import markdown, plot
from server.bench_placement_stats import (Request, combined_placement, combined_shift, keep, locality, progress,
                                          summary)
from server.bench_prefill import NO_REPLAN_S
from server.launcher import free_ports

SHAPES: dict[str, dict[str, int]] = {  # init_model overrides of the bench preset
    "bench": {"layers": 8},
    "many": {"layers": 8, "experts": 64, "experts_per_token": 6, "intermediate_size": 128},
}
USERS = ("alice", "bob", "carol")
MEMORY_RATIO = (1, 1, 2)
LINK, LATENCY = "500Mbit/s", "1ms"
PLACEMENTS = ("prism", "eplb", "slimcaching", "uniform", "replicate-popular")
LOAD_POLL_S, LOAD_TIMEOUT_S = 0.5, 300.0  # waiting for a placement to be resident before a measured phase


def placement_model(shape: str) -> Path:
    """The shape's checkpoint with three topics, generated once into the cache."""
    name = f"bench-placement-{shape}-topics{TOPIC_VERSION}"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "potluck" / name
    if not (cache / "config.json").exists():
        print(f"generating the {shape} placement model in {cache} (once)", flush=True)
        init_model("qwen3_moe", cache, "bench", topics=len(USERS), progress=lambda m: print("  " + m, flush=True),
                   **SHAPES[shape])  # type: ignore[arg-type]
    return cache


class PlacementCluster(UpCluster):
    """`potluck up --inventory` with the three users' homes, in a child process, driven over HTTP."""

    def __init__(self, model_dir: Path, workdir: Path, placement: str, memory: list[int], disk: str,
                 window_s: float, migration: bool = True, max_running: int = 8) -> None:
        self.port, *ports = free_ports(len(USERS) + 1)
        nodes = [{"name": f"agent{i}", "address": f"127.0.0.1:{port}", "expert_memory": memory[i],
                  "disk_bandwidth": disk, "link_bandwidth": LINK, "link_latency": LATENCY, "torch_threads": 1,
                  "users": [user]} for i, (port, user) in enumerate(zip(ports, USERS))]  # fmt: skip
        inventory = workdir / f"inventory-{self.port}.yaml"
        inventory.write_text(yaml.safe_dump({"nodes": nodes}, sort_keys=False))
        # The benchmark triggers each replan itself (POST /admin/replan), at the phase boundaries,
        # and each sees the statistics of the phase before it (a period), as a periodic replan would.
        self.cmd = [sys.executable, "-m", "server.cli", "up", "--inventory", str(inventory), "--model", str(model_dir),
                    "--port", str(self.port), "--served-model-name", "bench", "--max-running", str(max_running),
                    "--placement", placement, "--replan-every", str(NO_REPLAN_S), "--stats-window", str(window_s),
                    "--log-level", "WARNING",
                    *([] if migration else ["--no-migration"])]  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.AsyncClient(timeout=600)
        self.proc = None

    async def stream(self, req: Request, prompt: list[int], max_tokens: int, seed: int) -> Request:
        """One streamed completion, sampled at temperature 1 with its own seed (greedy decoding of
        random weights repeats one to three tokens, so decode would touch a handful of experts;
        sampled, the answer spreads over the topic's range as the prompt does); a failure (an HTTP
        error, an error chunk, fewer tokens than asked) is kept in `req.error`."""
        try:
            await self._stream(req, prompt, max_tokens, seed)
        except (RuntimeError, httpx.HTTPError) as exc:
            req.error = str(exc) or type(exc).__name__
        else:
            if req.tokens < max_tokens:
                req.error = f"{req.tokens} of {max_tokens} tokens"
        return req

    async def _stream(self, req: Request, prompt: list[int], max_tokens: int, seed: int) -> None:
        body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 1.0,
                "seed": seed, "ignore_eos": True, "logprobs": 0, "user": req.user}
        async with self.http.stream("POST", f"{self.url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"bench request failed: {response.status_code} {(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line.removeprefix("data: "))
                    if "error" in chunk:
                        raise RuntimeError(f"the stream failed: {chunk['error']}")
                    if tokens := tokens_in_chunk(chunk):
                        req.arrivals.append(time.perf_counter())
                        req.tokens += tokens

    async def get(self, path: str) -> Any:
        response = await self.http.get(f"{self.url}{path}")
        response.raise_for_status()
        return response.json() if path.startswith("/admin") else response.text

    async def replan(self) -> dict[str, Any]:
        response = await self.http.post(f"{self.url}/admin/replan")
        response.raise_for_status()
        report: dict[str, Any] = response.json()
        return report

    async def until_placed(self, timeout_s: float = LOAD_TIMEOUT_S) -> float | None:
        """Until every agent has its pinned experts resident (`GET /admin/placement` shows none
        loading); the seconds that took, or None if it did not within `timeout_s`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            report = await self.get("/admin/placement")
            if not any(x["loading"] for a in report["agents"].values() for x in a["layers"]):
                return time.monotonic() - start
            await asyncio.sleep(LOAD_POLL_S)
        return None

    async def counters(self) -> dict[str, float]:
        """The agents' COUNTERS, each summed over the agents, from /metrics (0 where not exported)."""
        samples = metric_samples(await self.get("/metrics"))
        return {key: summed(samples, name) or 0.0 for key, name in COUNTERS.items()}


# What a phase counts on the agents (their /metrics counters, summed over the agents).
COUNTERS = {"local": "potluck_agent_local_expert_calls_total", "remote": "potluck_agent_remote_expert_calls_total",
            "disk_read_bytes": "potluck_agent_disk_read_bytes_total", "steps": "potluck_agent_decode_steps_total",
            "tokens": "potluck_agent_decode_tokens_total", "round_trips": "potluck_agent_decode_round_trips_total",
            "cpu_s": "potluck_agent_cpu_seconds_total", "step_s": "potluck_agent_decode_step_seconds_total",
            "peer_wait_s": "potluck_agent_decode_peer_wait_seconds_total",
            "read_wait_s": "potluck_agent_decode_read_wait_seconds_total"}  # fmt: skip


WARM_UP_SEED = 1
# Every measured phase, of every placement and of the shift, has the same arrival times (and the
# same draws of prompt tokens within each user's current range): how many requests overlap moves
# the inter-token time on a shared host more than the placement does, so phases are compared
# under the same load.
MEASURED_SEED = 2


async def workload(cluster: PlacementCluster, topics: dict[str, int], vocab: int, seconds: float, rate: float,
                   prompt_tokens: int, gen_tokens: int, seed: int) -> list[Request]:
    """Each user's Poisson arrivals (`rate` a second) for `seconds`, prompts from its topic's range,
    each request with its own sampling seed (all drawn from `seed`)."""
    ranges = topic_ranges(vocab, len(USERS))
    rng, start, tasks = random.Random(seed), time.perf_counter(), []
    plans = []
    for user in USERS:
        t = rng.expovariate(rate)
        while t < seconds:
            span = ranges[topics[user]]
            prompt = [rng.randrange(span.start, span.stop) for _ in range(prompt_tokens)]
            plans.append((t, user, prompt, rng.randrange(2**31)))
            t += rng.expovariate(rate)
    for at, user, prompt, sampling_seed in sorted(plans, key=lambda p: p[0]):
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        req = Request(user, topics[user], time.perf_counter())
        tasks.append(asyncio.ensure_future(cluster.stream(req, prompt, gen_tokens, sampling_seed)))
    return list(await asyncio.gather(*tasks))


# The server refreshes the agents' counters on /metrics this often (and after a request ends):
# a phase's last scrape waits this long after its last request, so that it counts all of them.
COUNTERS_REFRESH_S = 2.5


async def phase(cluster: PlacementCluster, topics: dict[str, int], vocab: int, args: argparse.Namespace,
                seed: int) -> dict[str, Any]:
    before = await cluster.counters()
    requests = await workload(cluster, topics, vocab, args.phase_seconds, args.rate, args.prompt_tokens,
                              args.gen_tokens, seed)
    await asyncio.sleep(COUNTERS_REFRESH_S)
    after = await cluster.counters()
    return summary(requests, {k: after[k] - before[k] for k in COUNTERS})


async def run_placement(model_dir: Path, workdir: Path, placement: str, memory: list[int], disk: str,
                        vocab: int, args: argparse.Namespace, top: int) -> dict[str, Any]:
    topics = {u: i for i, u in enumerate(USERS)}
    async with PlacementCluster(model_dir, workdir, placement, memory, disk, args.phase_seconds) as cluster:
        await phase(cluster, topics, vocab, args, seed=WARM_UP_SEED)  # warm-up: the window fills
        report = await cluster.replan()
        stats = await cluster.get("/admin/stats")
        loaded_s = await cluster.until_placed()  # the placement measured, not the move to it
        measured = await phase(cluster, topics, vocab, args, seed=MEASURED_SEED)
    homes = {u: f"agent{i}" for i, u in enumerate(USERS)}
    return {"placement": placement, **measured, "placement_cost": report["last"] and report["last"]["remote_calls"],
            "migrated": bool(report["last"] and report["last"]["migrated"]), "loaded_s": loaded_s,
            "locality": locality(stats, homes, top)}  # fmt: skip


async def run_shift(model_dir: Path, workdir: Path, memory: list[int], disk: str, vocab: int,
                    args: argparse.Namespace, migration: bool) -> dict[str, Any]:
    """prism through a workload shift: before, just after (no replan yet), after one replan."""
    before = {u: i for i, u in enumerate(USERS)}
    after = {u: (i + 1) % len(USERS) for i, u in enumerate(USERS)}
    out: dict[str, Any] = {"migration": migration, "phases": []}
    async with PlacementCluster(model_dir, workdir, "prism", memory, disk, args.phase_seconds,
                                migration=migration) as cluster:
        async def measured(name: str, topics: dict[str, int]) -> None:
            out["phases"].append({"phase": name, **await phase(cluster, topics, vocab, args, seed=MEASURED_SEED)})

        await phase(cluster, before, vocab, args, seed=WARM_UP_SEED)
        await cluster.replan()
        await cluster.until_placed()
        await measured("before the shift", before)
        await measured("shifted, first period", after)
        report = await cluster.replan()
        out["replan_migrated"] = bool(report["last"] and report["last"]["migrated"])
        await measured("shifted, after a replan", after)  # the move to the new placement counts here
    return out


def main(args: argparse.Namespace) -> int:
    placements = list(PLACEMENTS) if args.placements == "all" else args.placements.split(",")
    if unknown := [p for p in placements if p not in PLACEMENTS]:
        raise SystemExit(f"potluck bench placement: unknown --placements {unknown}; choose from {', '.join(PLACEMENTS)}")
    shapes = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        raise SystemExit(f"potluck bench placement: unknown --shapes {unknown}; choose from {', '.join(SHAPES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.jsonl").write_text("")  # this run's cases only
    data: dict[str, Any] = {"command": shlex.join(["potluck", *sys.argv[1:]]), "rate": args.rate, "rounds": args.rounds,
                            "phase_seconds": args.phase_seconds, "prompt_tokens": args.prompt_tokens,
                            "gen_tokens": args.gen_tokens, "shapes": []}  # fmt: skip
    for shape in shapes:
        model_dir = args.model if args.model and len(shapes) == 1 else placement_model(shape)
        cfg, ckpt = MoeConfig.load(model_dir), Checkpoint(model_dir)
        moe = [layer for layer in range(cfg.num_layers) if cfg.is_moe(layer)]
        one = ckpt.nbytes(cfg.expert_tensor_names(moe[0], 0))
        total = one * len(moe) * cfg.num_experts
        unit = int(total * args.pooled_fraction / sum(MEMORY_RATIO))
        memory = [max(2 * one, unit * r) for r in MEMORY_RATIO]
        entry: dict[str, Any] = {"shape": shape, "placements": [], "shift": [], "settings": {
            "experts": cfg.num_experts, "top_k": cfg.top_k, "moe_layers": len(moe), "memory": memory,
            "pooled_fraction": sum(memory) / total, "expert_bytes_total": total, "disk": args.placement_disk,
            "uniform_entropy": math.log2(cfg.num_experts), "link": LINK, "latency": LATENCY}}  # fmt: skip
        print(f"placement, {shape}: {cfg.num_experts} experts top-{cfg.top_k}, memory {memory}", flush=True)
        with tempfile.TemporaryDirectory(prefix="potluck-bench-placement-") as work:
            # Rounds interleave the cases (every policy once, then again), so that the host's drift
            # over the run falls on all of them alike.
            cases: dict[str, list[dict[str, Any]]] = {p: [] for p in placements}
            shifts: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
            for r in range(args.rounds):
                for p in placements:
                    case = asyncio.run(run_placement(model_dir, Path(work), p, memory, args.placement_disk,
                                                     cfg.vocab_size, args, top=cfg.top_k * 2))
                    print(f"  round {r + 1}, {p}: {progress(case)}", flush=True)
                    cases[p].append(case)
                    keep(out, {"shape": shape, "round": r + 1, **case})
                for migration in () if args.no_shift else (True, False):
                    shift = asyncio.run(run_shift(model_dir, Path(work), memory, args.placement_disk,
                                                  cfg.vocab_size, args, migration))
                    for ph in shift["phases"]:
                        print(f"  round {r + 1}, shift ({'migration' if migration else 'no migration'}), "
                              f"{ph['phase']}: {progress(ph)}", flush=True)
                    shifts[migration].append(shift)
                    keep(out, {"shape": shape, "round": r + 1, "shift": True, **shift})
            entry["placements"] = [combined_placement(p, runs) for p, runs in cases.items()]
            entry["shift"] = [combined_shift(m, runs) for m, runs in shifts.items() if runs]
        data["shapes"].append(entry)
    (out / "placement.json").write_text(json.dumps(data, indent=2))
    (out / "placement.md").write_text(markdown(data) + "\n![placement](placement.png)\n")
    plot(data, out / "placement.png")
    print(markdown(data))
    print(f"wrote {out / 'placement.json'}, {out / 'placement.md'}, {out / 'placement.png'}")
    return 0
