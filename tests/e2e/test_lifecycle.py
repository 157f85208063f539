"""Clients that leave, and agents that die: nothing hangs, nothing runs on for nobody."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.conftest import PotluckUp, alive, children_of, start_up

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me everything."}]
# Greedy, so whether an end-of-sequence token cuts the request short is decided once, not by chance
# (with sampling, an early EOS now and then finished the "long" request before the test could act).
# About the most the tiny model's context (2048) allows: seconds of decode, well past the 1.5 s an
# impatient client below waits.
LONG = {"messages": MESSAGES, "max_tokens": 2000, "temperature": 0}
MAX_RUNNING = 4  # `potluck up`'s default --max-running


def wait_idle(base_url: str, within_s: float) -> float:
    """Seconds until the engine runs and queues nothing; fails after `within_s`."""
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        health = httpx.get(f"{base_url}/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            return time.monotonic() - start
        time.sleep(0.1)
    pytest.fail(f"the engine was still busy {within_s}s after the client left")


def test_stream_client_disconnect_cancels_the_request(base_url: str, client: OpenAI, model_id: str) -> None:
    body = {**LONG, "model": model_id, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        next(line for line in lines if '"content":"' in line and '"role"' not in line)
        assert httpx.get(f"{base_url}/health").json()["running"] == 1
    # 1500 tokens would take far longer than this: the request was cancelled, not finished.
    wait_idle(base_url, within_s=5)
    after = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=3)
    assert after.choices[0].finish_reason in ("stop", "length")


def test_a_queued_stream_whose_client_leaves_never_runs(base_url: str, model_id: str) -> None:
    body = {**LONG, "model": model_id, "stream": True}
    url = f"{base_url}/v1/chat/completions"
    with contextlib.ExitStack() as streams:
        # As many running streams as the server runs at once (its default --max-running), each
        # past its first content chunk. Keep the line iterators referenced: dropping one closes
        # the connection (a disconnect).
        lines = []
        for _ in range(MAX_RUNNING):
            running = streams.enter_context(httpx.stream("POST", url, json=body, timeout=60))
            lines.append(running.iter_lines())
            next(line for line in lines[-1] if '"content":"' in line and '"role"' not in line)
        queued = streams.enter_context(httpx.stream("POST", url, json=body, timeout=60))
        lines.append(queued.iter_lines())
        next(line for line in lines[-1] if line.startswith("data: "))  # the role chunk
        health = httpx.get(f"{base_url}/health").json()
        assert (health["running"], health["waiting"]) == (MAX_RUNNING, 1), health
    # All left: the running ones are cancelled, and the queued one is dropped before it starts.
    wait_idle(base_url, within_s=5)


def test_non_stream_client_disconnect_cancels_the_request(base_url: str, client: OpenAI, model_id: str) -> None:
    def impatient_client() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base_url}/v1/chat/completions", json={**LONG, "model": model_id}, timeout=1.5)

    with ThreadPoolExecutor(1) as pool:
        gone = pool.submit(impatient_client)
        deadline = time.monotonic() + 3
        while httpx.get(f"{base_url}/health").json()["running"] != 1:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
        gone.result()  # the client gave up (closed its connection) while its request ran
    wait_idle(base_url, within_s=5)
    after = client.completions.create(model=model_id, prompt="still here?", max_tokens=3)
    assert after.choices[0].finish_reason in ("stop", "length")


def test_an_agent_dying_mid_stream_ends_it_with_an_error_and_up_exits_nonzero(qwen_tiny: Path,
                                                                              e2e_dir: Path) -> None:  # fmt: skip
    server: PotluckUp = start_up(qwen_tiny, e2e_dir)
    # The request's home dies: agent0, the first agent of an idle cluster (choose_home). Another
    # agent may die unnoticed by a stream whose home has read every expert it held.
    home = next(pid for pid in server.agents if b"agent0" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))
    try:
        body = {**LONG, "model": "qwen3_moe", "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as reply:
            lines = reply.iter_lines()
            next(line for line in lines if '"content":"' in line and '"role"' not in line)
            os.kill(home, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][len("data: "):])["error"]
        assert error["code"] in ("agent_failed", "no_agents_available") and error["message"]
        assert server.proc.wait(60) == 1, server.log_tail()
        assert "agent0" in server.log_tail(80)
        assert not any(alive(pid) for pid in server.agents)
    finally:
        if server.proc.poll() is None:
            server.stop()


# A bench process holding one cluster until it is killed.
BENCH_HOLDING_A_CLUSTER = """
import asyncio, sys
from pathlib import Path
from server.bench_prefill import ABLATIONS, Cluster

async def main():
    async with Cluster(Path(sys.argv[1]), Path(sys.argv[2]), 2, ABLATIONS["sirius"], 0, 0.0, 0.0) as cluster:
        print(cluster.proc.pid, flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


def test_a_killed_bench_takes_its_cluster_with_it(qwen_tiny: Path, tmp_path: Path) -> None:
    """The prefill bench runs each case's cluster (`potluck up` and its agents) as child processes;
    killed outright, with no chance to stop them, it leaves none of them running."""
    bench = subprocess.Popen([sys.executable, "-c", BENCH_HOLDING_A_CLUSTER, str(qwen_tiny), str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    cluster: list[int] = []
    try:
        assert bench.stdout is not None
        line = bench.stdout.readline()
        assert line.strip().isdigit(), f"the bench did not start its cluster (exit code {bench.poll()})"
        up = int(line)
        cluster = [up, *children_of(up)]
        assert len(cluster) >= 3  # `potluck up` and its two agents
        bench.kill()
        bench.wait()
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in cluster) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in cluster if alive(pid)]
    finally:
        for pid in (p for p in cluster if alive(p)):
            os.kill(pid, signal.SIGKILL)
        if bench.poll() is None:
            bench.kill()
