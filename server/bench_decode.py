"""`potluck bench decode`: inter-token time of real local clusters, against transformers' own decode.

Every cluster is `potluck up --inventory` in a child process (agents are its children, real gRPC
on loopback), driven only through its outside interfaces: streamed `/v1/completions` requests
(httpx) and `/metrics`. Each request is a prompt of `--prompt-tokens` random token ids with
`max_tokens=--gen-tokens`, temperature 0, `logprobs: 0` (so every chunk names the tokens it
carries) and `ignore_eos: true` (vLLM's extension: an end-of-sequence token does not end the
stream, so every request decodes `--gen-tokens` tokens, as transformers' loop below does). The
inter-token time is the gap between consecutive token chunks as they arrive (the first chunk is
the TTFT and is left out); a case's figure is the median over its `--rounds` rounds of each
round's median gap. Should a stream still end early (a server that ignores the field), its gaps
are over what arrived, and the report says how many tokens the shortest stream got.

Every case, baselines included, gets the same warm-up (one request on the warm-up prompt, after
which the cluster fills free expert memory; the bench waits until the agents stop reading) and
the same rounds (the same prompts). Cases:

- compute: the `bench` model on 1, 2 and 4 agents (`--decode-agents`), every expert resident
  (unlimited expert memory), no throttles, each agent with `--threads` torch threads (inventory
  `torch_threads`); and transformers' own decode of the same checkpoint in this process (float32,
  greedy, token by token with its KV cache) with the same thread count. Transformers runs round
  by round between the 1-agent cluster's requests, once that cluster has settled, so the two
  never compute at the same time.
- lan: 4 agents, link `1Gbit/s` with `--lan-latency` one way, expert memory 25% of all expert
  bytes each (the pool holds the model once), each with `--lan-threads` torch threads (default:
  its fair share of the host's cores, so that the four never oversubscribe it). Its bound is the
  1-agent compute-bound median on as many threads (a case of its own where that is not
  `--threads`) plus one round trip (twice the latency) per MoE layer. Round trips per token come from the agents'
  decode counters on /metrics, summed over agents, around the timed requests. The server
  refreshes those every 2 s and shortly after a request ends, so the bench scrapes until they
  have settled: before, until they stop changing; after, until they count the tokens the bench
  received minus each request's first (its prefill's) or stop changing. Counters that never
  settle (within a deadline) give n/a, not a figure from a stale scrape.
- streams: 1, 2, 4 and 8 concurrent streams (`--streams`) on the LAN cluster (started with
  `--max-running` = the most streams): tokens all streams received over the wall time from the
  first request sent to the last token, and each stream's median inter-token time. The lan and
  streams cases take turns round by round, so that they share the host's drift.
- lan-disk: the LAN cluster with each agent's disk read at `--lan-disk` (where the lan case's
  reads are page-cache copies), 1 and 4 concurrent streams, their rounds taking turns: where the
  pool's reads leave its experts, and what a stream costs then. No target: a figure to compare.
- io: experts that must be read (`bench_decode_io.py`): 2 and 4 agents (`--io-agents`) holding
  half the experts together, disk `--io-disk`, the LAN's link; whole experts on demand
  (`--expert-split never --no-decode-prefetch`) against split experts, + the load balance, + the
  decode prefetch, and each of the three switched off alone, with each agent's bytes read and the
  prefetch's hit rate.

Writes decode.json, decode.md and decode.png to `--out` and prints the table with its targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig
from server.bench import default_bench_model
from server.bench_decode_cluster import LINK, DecodeCluster, DecodeRun
from server.bench_decode_report import label, text_table, write_report
from server.bench_decode_stats import (Arrival, DecodeCounters, StreamTiming, decoded_tokens, round_trips_per_token,
                                       round_trips_per_token_over, summarize)  # fmt: skip
from server.bench_decode_io import expert_token_s, run_io
from server.bench_prefill import prompts_for
from server.launcher import threads_per_agent

CASES = ("compute", "lan", "streams", "lan-disk", "io")
DISK_STREAMS = (1, 4)  # the lan-disk case's concurrent streams
LAN_AGENTS = 4


class TransformersDecode:
    """transformers' own decode of the checkpoint, in this process: float32, greedy, one token per
    forward with its KV cache (`cache`, formerly past_key_values); it never stops at an
    end-of-sequence token."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.inference_mode()
    def stream(self, prompt: list[int], max_tokens: int) -> StreamTiming:
        sent = time.perf_counter()
        out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)  # [1, 1]
        arrivals = [Arrival(time.perf_counter(), 1)]
        for _ in range(max_tokens - 1):
            out = self.model(input_ids=token, cache=out.cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            arrivals.append(Arrival(time.perf_counter(), 1))
        return StreamTiming(sent, tuple(arrivals), "length")


async def run_compute(run: DecodeRun, counts: list[int], reference: TransformersDecode) -> list[dict[str, Any]]:
    """The compute-bound clusters, and transformers round by round beside the 1-agent one."""
    out, theirs = [], []
    if 1 not in counts:  # no 1-agent cluster to alternate with: transformers alone, nothing else running
        reference.stream(run.warmup, run.gen_tokens)
        theirs = [[reference.stream(p, run.gen_tokens)] for p in run.prompts]
    for agents in counts:
        async with DecodeCluster(run, agents) as cluster:
            await cluster.stream(run.warmup, run.gen_tokens)
            if agents == 1:
                await cluster.settle()
                reference.stream(run.warmup, run.gen_tokens)
            before, rounds = await cluster.settled_counters(), []
            for prompt in run.prompts:
                await cluster.settle()
                rounds.append([await cluster.stream(prompt, run.gen_tokens)])
                if agents == 1:
                    await cluster.settle()
                    theirs.append([reference.stream(prompt, run.gen_tokens)])
            trips = round_trips_per_token(before, await cluster.settled_counters(before, decoded_tokens(rounds)))
        out.append(_progress(summarize("compute", agents, 1, rounds, trips)))
    return [_progress(summarize("transformers", 1, 1, theirs)), *out]


async def run_lan_reference(run: DecodeRun) -> dict[str, Any]:
    """One agent as the compute-bound case, on a LAN agent's threads: the LAN bound's compute."""
    async with DecodeCluster(run, 1, threads=run.lan_threads) as cluster:
        await cluster.stream(run.warmup, run.gen_tokens)
        before, rounds = await cluster.settled_counters(), []
        for prompt in run.prompts:
            await cluster.settle()
            rounds.append([await cluster.stream(prompt, run.gen_tokens)])
        trips = round_trips_per_token(before, await cluster.settled_counters(before, decoded_tokens(rounds)))
    return _progress(summarize("lan-compute", 1, 1, rounds, trips))


async def run_lan(run: DecodeRun, plan: list[tuple[str, int]], disk: float = 0.0) -> list[dict[str, Any]]:
    """The LAN cluster (each agent's disk read at `disk`; 0: no throttle), the (case, streams) of
    `plan` with their rounds interleaved (round r of every case before round r + 1 of any), so
    that the host's drift over the minutes of the run falls on the one-stream baseline as on the
    cases compared with it. The agents' counters are scraped between rounds: each round's round
    trips go to its case."""
    rounds: dict[tuple[str, int], list[list[StreamTiming]]] = {p: [] for p in plan}
    scrapes: dict[tuple[str, int], list[tuple[DecodeCounters | None, DecodeCounters | None]]] = {p: [] for p in plan}
    async with DecodeCluster(run, LAN_AGENTS, run.lan_memory, LINK, run.lan_latency_s,
                             max(k for _, k in plan), run.lan_threads, disk=disk) as cluster:  # fmt: skip
        await cluster.stream(run.warmup, run.gen_tokens)
        before = await cluster.settled_counters()
        for r, prompt in enumerate(run.prompts):
            for case, k in plan:
                await cluster.settle()  # (no decode step runs while it waits: `before` still holds)
                got = await cluster.streams([prompt] if k == 1 else run.stream_prompts[r][:k], run.gen_tokens)
                after = await cluster.settled_counters(before, decoded_tokens([got]))
                rounds[case, k].append(got)
                scrapes[case, k].append((before, after))
                before = after if after is not None else await cluster.settled_counters()
    return [_progress(summarize(case, LAN_AGENTS, k, rounds[case, k], round_trips_per_token_over(scrapes[case, k])))
            for case, k in plan]


def _progress(case: dict[str, Any]) -> dict[str, Any]:
    itl, rate = case["median_itl_s"], case["aggregate_tokens_per_s"]
    print(f"{label(case)}: median inter-token {'n/a' if itl is None else f'{itl * 1e3:.1f} ms'}, "
          f"{'n/a' if rate is None else f'{rate:.1f}'} tokens/s, at least {case['min_tokens']} tokens per stream",
          flush=True)
    return case


def versions() -> dict[str, str]:
    """The baseline's and the compute's libraries: a report compares against transformers as
    installed, and its decode got faster between versions."""
    import transformers  # the baseline's own import, as TransformersDecode makes it

    return {"transformers": transformers.__version__, "torch": torch.__version__}


def _counts(text: str, flag: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"potluck bench decode: {flag} takes whole numbers >= 1 separated by commas, got {text!r}")
    return sorted(set(counts))


def main(args: argparse.Namespace) -> int:
    cases = list(CASES) if args.cases == "all" else args.cases.split(",")
    if unknown := [c for c in cases if c not in CASES]:
        raise SystemExit(f"potluck bench decode: unknown --cases {unknown}; choose from {', '.join(CASES)} or all")
    agent_counts, stream_counts = _counts(args.decode_agents, "--decode-agents"), _counts(args.streams, "--streams")
    io_counts = _counts(args.io_agents, "--io-agents")
    model_dir = Path(args.model) if args.model else default_bench_model()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, ckpt = MoeConfig.load(model_dir), Checkpoint(model_dir)
    moe_layers = [layer for layer in range(cfg.num_layers) if cfg.is_moe(layer)]
    expert_bytes = sum(ckpt.nbytes(cfg.expert_tensor_names(layer, e)) for layer in moe_layers
                       for e in range(cfg.num_experts))  # fmt: skip
    threads = args.threads or 2
    # Four agents on this host share its cores: each gets its fair share, as `potluck up` gives
    # it, so that the LAN case never measures oversubscription (ARCHITECTURE: one torch thread each
    # on a 2-core host); its bound is one agent's compute on as many threads.
    lan_threads = args.lan_threads or threads_per_agent(LAN_AGENTS, os.cpu_count() or 1)
    most = max([*(stream_counts if "streams" in cases else [1]), *(DISK_STREAMS if "lan-disk" in cases else [])])
    # Seeded: every case (and a rerun) decodes the same prompts.
    prompts = prompts_for(args.prompt_tokens, cfg.vocab_size, 1 + args.rounds * (1 + most), seed=args.prompt_tokens)
    data: dict[str, Any] = {
        "command": shlex.join(["potluck", *sys.argv[1:]]), "model": str(model_dir), "moe_layers": len(moe_layers),
        "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "rounds": args.rounds,
        "threads": threads, "lan_threads": lan_threads, "cores": os.cpu_count(), "versions": versions(), "expert_bytes_total": expert_bytes, "lan_agents": LAN_AGENTS,
        "lan_expert_memory": expert_bytes // LAN_AGENTS, "link": LINK, "link_latency_s": args.lan_latency,
        "max_running": most,
    }  # fmt: skip
    if "lan-disk" in cases:
        data.update(lan_disk=args.lan_disk, lan_disk_streams=list(DISK_STREAMS))
    if "io" in cases:
        data.update(io_disk=args.io_disk, io_pool=expert_bytes // 2, io_expert_token_s=expert_token_s(model_dir),
                    io_expert_read_s=expert_bytes / (len(moe_layers) * cfg.num_experts) / args.io_disk)
    print(f"decode: {args.gen_tokens} tokens after {args.prompt_tokens}, {args.rounds} rounds, {threads} torch threads, "
          f"cases {', '.join(cases)}, model {model_dir}", flush=True)
    with tempfile.TemporaryDirectory(prefix="potluck-bench-decode-") as work:
        run = DecodeRun(
            model_dir=model_dir, workdir=Path(work), threads=threads, lan_threads=lan_threads, gen_tokens=args.gen_tokens, warmup=prompts[0],
            prompts=prompts[1:1 + args.rounds],
            stream_prompts=[prompts[1 + args.rounds + r * most:1 + args.rounds + (r + 1) * most]
                            for r in range(args.rounds)],
            lan_memory=expert_bytes // LAN_AGENTS, lan_latency_s=args.lan_latency, io_disk=args.io_disk,
            io_pool=expert_bytes // 2, lan_disk=args.lan_disk,
        )  # fmt: skip
        data["cases"] = asyncio.run(_run_cases(run, cases, agent_counts, stream_counts, io_counts))
    data["min_tokens"] = min(c["min_tokens"] for c in data["cases"])
    data["stopped"] = sum(c["stopped"] for c in data["cases"])
    (out / "decode.json").write_text(json.dumps(data, indent=2))
    write_report(data, out)
    print(text_table(data))
    print(f"wrote {out / 'decode.json'}, {out / 'decode.md'}, {out / 'decode.png'}")
    return 0


async def _run_cases(run: DecodeRun, cases: list[str], agent_counts: list[int], stream_counts: list[int],
                     io_counts: list[int]) -> list[dict[str, Any]]:
    results = []
    if "compute" in cases:
        results += await run_compute(run, agent_counts, TransformersDecode(run.model_dir, run.threads))
    if "lan" in cases and not (run.lan_threads == run.threads and "compute" in cases and 1 in agent_counts):
        results.append(await run_lan_reference(run))
    if "lan" in cases or "streams" in cases:
        plan = [("lan", 1)] if "lan" in cases else []
        results += await run_lan(run, plan + [("streams", k) for k in stream_counts if "streams" in cases])
    if "lan-disk" in cases:
        results += await run_lan(run, [("lan-disk", k) for k in DISK_STREAMS], disk=run.lan_disk)
    if "io" in cases:
        results += await run_io(run, io_counts)
    return results
