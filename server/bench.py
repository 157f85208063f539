"""`potluck bench`: 1-agent prefill against transformers' own forward pass, side by side.

Runs a real agent as a child process (real gRPC) with every expert resident (a warm-up request
loads them), then times prefills of the same prompt length through potluck and through
`transformers` in this process, alternating, with the same torch thread count. Both do the same
work: every position's experts in every layer and every position's logits (a serving prefill
needs only the last position's, and skips the last layer's experts for the others; the second
potluck row times that, for information). The logits of the two are compared, so the equal work
is checked, not assumed. Prints a table and writes JSON. Figures are medians of the repeats,
measured in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from node_agent.model.synth import init_model
from protos.security import Credentials
from server.certs import SERVER_FOLDER, throwaway
from server.launcher import die_with_parent, free_port
from scheduler.client import AgentClient
from scheduler.partition import contiguous_prefill
from scheduler.runner import ClusterView, RequestRunner
from scheduler.types import NodeId, NodeSpec


def default_bench_model() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "potluck" / "bench-qwen3_moe"
    if not (cache / "config.json").exists():
        print(f"generating the bench model in {cache} (once)", flush=True)
        init_model("qwen3_moe", cache, "bench", progress=lambda m: print("  " + m, flush=True))
    return cache


async def wait_ready(client: AgentClient, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.info(timeout_s=2.0)
            return
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the bench agent did not start (exit code {proc.poll()})") from None
            await asyncio.sleep(0.3)


async def time_side_by_side(model_dir: Path, prompts: list[list[int]], threads: int
                            ) -> tuple[list[float], list[float], list[float], float]:
    """Alternate potluck (1 agent, child process) and transformers (this process) on each prompt,
    so both see the same machine conditions; only one of them computes at a time. Returns
    potluck's times with every position's logits, with the last one's only, transformers' times,
    and the largest difference between the two's logits."""
    from transformers import AutoModelForCausalLM

    address = f"127.0.0.1:{free_port()}"
    certs = Path(tempfile.mkdtemp(prefix="potluck-bench-certs-"))  # TLS, as a deployed agent runs
    folders = throwaway(certs, ["bench"])
    cmd = [sys.executable, "-m", "server.cli", "agent", "--listen", address, "--model", str(model_dir),
           "--name", "bench", "--torch-threads", str(threads), "--log-level", "WARNING", "--certs", str(folders["bench"])]
    proc = subprocess.Popen(cmd, preexec_fn=die_with_parent)
    client = AgentClient(NodeSpec(NodeId("bench"), address), creds=Credentials.load(folders[SERVER_FOLDER]))
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ours, last, theirs, diff = [], [], [], 0.0
    try:
        await wait_ready(client, proc)
        runner = RequestRunner([client], ClusterView.from_infos([await client.info()]))
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            logits = await runner.run_step(f"bench-{i}", contiguous_prefill(prompt, [client.name]), all_logits=True)
            ours.append(time.perf_counter() - start)
            await runner.release(f"bench-{i}", [client.name])
            start = time.perf_counter()
            await runner.run_step(f"bench-last-{i}", contiguous_prefill(prompt, [client.name]))
            last.append(time.perf_counter() - start)
            await runner.release(f"bench-last-{i}", [client.name])
            with torch.inference_mode():
                start = time.perf_counter()
                expected = model(torch.tensor([prompt])).logits[0]
                theirs.append(time.perf_counter() - start)
            diff = max(diff, (logits - expected).abs().max().item())
        return ours, last, theirs, diff
    finally:
        await client.close()
        proc.terminate()
        shutil.rmtree(certs, ignore_errors=True)
        proc.wait(timeout=30)


def main(args: argparse.Namespace) -> int:
    model_dir = Path(args.model) if args.model else default_bench_model()
    threads = args.threads or os.cpu_count() or 1
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    # One warm-up prompt first (loads every expert into the agent, warms transformers' kernels).
    prompts = [torch.randint(0, vocab, (args.tokens,), generator=g).tolist() for _ in range(args.repeats + 1)]
    print(f"prefill of {args.tokens} tokens, {args.repeats} repeats, {threads} torch threads, model {model_dir}", flush=True)
    ours, last, theirs, diff = asyncio.run(time_side_by_side(model_dir, prompts, threads))
    ours, last, theirs = ours[1:], last[1:], theirs[1:]
    p_med, l_med, t_med = statistics.median(ours), statistics.median(last), statistics.median(theirs)
    result = {
        "tokens": args.tokens, "repeats": args.repeats, "threads": threads, "model": str(model_dir),
        "work": "every position's experts and logits, on both sides",
        "potluck_1_agent_s": ours, "potluck_last_logits_s": last, "transformers_s": theirs,
        "potluck_median_s": p_med, "potluck_last_logits_median_s": l_med, "transformers_median_s": t_med,
        "potluck_tokens_per_s": args.tokens / p_med, "transformers_tokens_per_s": args.tokens / t_med,
        "ratio_potluck_over_transformers": p_med / t_med, "max_abs_logit_difference": diff,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill_vs_transformers.json").write_text(json.dumps(result, indent=2))
    print(f"{'':28}{'median s':>10}{'tokens/s':>10}")
    print(f"{'potluck, 1 agent (gRPC)':28}{p_med:>10.3f}{args.tokens / p_med:>10.0f}")
    print(f"{'transformers, one process':28}{t_med:>10.3f}{args.tokens / t_med:>10.0f}")
    print(f"{'potluck, last logits only':28}{l_med:>10.3f}{args.tokens / l_med:>10.0f}  (a serving prefill; not the same work)")
    print(f"ratio potluck / transformers on the same work: {p_med / t_med:.2f}x (target <= 1.5x); "
          f"largest logit difference {diff:.1e}; written to {out}")
    return 0
