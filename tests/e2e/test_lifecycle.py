"""Clients that leave, and agents that die: nothing hangs, nothing runs on for nobody."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.conftest import PotluckUp, alive, children_of, start_up

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me everything."}]
# Greedy, so whether an end-of-sequence token cuts the request short is decided once, not by chance
# (with sampling, an early EOS now and then finished the "long" request before the test could act).
# About the most the tiny model's context (2048) allows: seconds of decode, so a client leaves
# while it runs, and a request that ends with fewer tokens was cut short.
MAX_TOKENS = 2000
LONG = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0}
MAX_RUNNING = 4  # `potluck up`'s default --max-running
# A deadline against hanging, far beyond what any wait below takes even on a busy host; no test
# claims anything about how soon a request starts or ends.
DEADLINE_S = 60.0
# The server's log line for a request that ended, written once the request is released on every
# agent (server/generation.py).
FINISHED = re.compile(r"request (?P<id>\S+) finished: .*\boutput_tokens=(?P<tokens>\d+) .*\bfinish_reason=(?P<reason>\S+)")


@dataclass(frozen=True)
class Ended:
    request_id: str  # the response's id ("chatcmpl-...")
    output_tokens: int  # tokens generated before it ended
    finish_reason: str  # stop, length, cancelled (the client left), or error


class Ends:
    """The requests that the server reports ended, since this object was made, in order.

    A test checks a cancellation by what the server reports of the request (cancelled, with
    fewer tokens than asked), not by how soon the engine goes idle: a request never cancelled
    also leaves the engine idle once it finishes, within seconds on a fast host, and a busy host
    may take longer than any guess to do either."""

    def __init__(self, server: PotluckUp) -> None:
        self.path = server.log_path
        self.start = self.path.stat().st_size

    def now(self) -> list[Ended]:
        with self.path.open("rb") as log:
            log.seek(self.start)
            text = log.read().decode(errors="replace")
        whole = text[: text.rfind("\n") + 1]  # a line still being written waits for the next look
        return [Ended(m["id"], int(m["tokens"]), m["reason"]) for m in FINISHED.finditer(whole)]

    def wait(self, count: int) -> list[Ended]:
        """The first `count` requests to end (waits for them)."""
        deadline = time.monotonic() + DEADLINE_S
        while len(ended := self.now()) < count:
            assert time.monotonic() < deadline, f"{len(ended)} of {count} requests ended within {DEADLINE_S}s"
            time.sleep(0.05)
        return ended[:count]


def response_id(line: str) -> str:
    return str(json.loads(line.removeprefix("data: "))["id"])


def engine_load(base_url: str) -> tuple[int, int]:
    """Requests (running, waiting) in the engine now."""
    health = httpx.get(f"{base_url}/health").json()
    return health["running"], health["waiting"]


def wait_for_load(base_url: str, load: tuple[int, int]) -> None:
    """Waits until the engine runs and queues `load`: a request reaches the engine a moment after
    its response began (a stream's role chunk), or after its client has sent it."""
    deadline = time.monotonic() + DEADLINE_S
    while (now := engine_load(base_url)) != load:
        assert time.monotonic() < deadline, f"the engine's (running, waiting) stayed {now}, not {load}"
        time.sleep(0.05)


def test_stream_client_disconnect_cancels_the_request(potluck: PotluckUp, client: OpenAI, model_id: str) -> None:
    ends = Ends(potluck)
    body = {**LONG, "model": model_id, "stream": True}
    with httpx.stream("POST", f"{potluck.url}/v1/chat/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        first = next(line for line in lines if '"content":"' in line and '"role"' not in line)
        assert engine_load(potluck.url) == (1, 0)
    # The client left mid-stream: the request ends cancelled, cut short, and nothing runs on.
    [ended] = ends.wait(1)
    assert (ended.request_id, ended.finish_reason) == (response_id(first), "cancelled")
    assert ended.output_tokens < MAX_TOKENS
    assert engine_load(potluck.url) == (0, 0)
    after = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=3)
    assert after.choices[0].finish_reason in ("stop", "length")


def test_a_queued_stream_whose_client_leaves_never_runs(potluck: PotluckUp, model_id: str) -> None:
    ends = Ends(potluck)
    body = {**LONG, "model": model_id, "stream": True}
    url = f"{potluck.url}/v1/chat/completions"
    with contextlib.ExitStack() as streams:
        # As many running streams as the server runs at once (its default --max-running), each
        # past its first content chunk. Keep the line iterators referenced: dropping one closes
        # the connection (a disconnect).
        lines, running = [], []
        for _ in range(MAX_RUNNING):
            stream = streams.enter_context(httpx.stream("POST", url, json=body, timeout=60))
            lines.append(stream.iter_lines())
            running.append(response_id(next(line for line in lines[-1] if '"content":"' in line and '"role"' not in line)))
        with httpx.stream("POST", url, json=body, timeout=60) as queued:
            lines.append(queued.iter_lines())
            role = next(line for line in lines[-1] if line.startswith("data: "))  # the role chunk
            wait_for_load(potluck.url, (MAX_RUNNING, 1))
        # The queued client left while every slot stayed taken: its request is dropped from the
        # queue, having produced nothing, and the running ones run on.
        assert ends.wait(1) == [Ended(response_id(role), 0, "cancelled")]
        assert engine_load(potluck.url) == (MAX_RUNNING, 0)
    # The running ones' clients left too: each was still running (so the queued one never got a
    # slot), and is cancelled.
    rest = ends.wait(1 + MAX_RUNNING)[1:]
    assert sorted(e.request_id for e in rest) == sorted(running)
    assert all(e.finish_reason == "cancelled" and e.output_tokens < MAX_TOKENS for e in rest), rest
    assert engine_load(potluck.url) == (0, 0)


def test_non_stream_client_disconnect_cancels_the_request(potluck: PotluckUp, client: OpenAI, model_id: str) -> None:
    ends = Ends(potluck)
    body = json.dumps({**LONG, "model": model_id}).encode()
    host, port = potluck.url.removeprefix("http://").rsplit(":", 1)
    # A bare HTTP client, so that the test chooses when it leaves: once its request runs (an
    # impatient client on a timer might leave before it starts, or after it ends).
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        wait_for_load(potluck.url, (1, 0))
    # The client closed its connection while its request ran.
    [ended] = ends.wait(1)
    assert ended.finish_reason == "cancelled" and ended.output_tokens < MAX_TOKENS, ended
    assert engine_load(potluck.url) == (0, 0)
    after = client.completions.create(model=model_id, prompt="still here?", max_tokens=3)
    assert after.choices[0].finish_reason in ("stop", "length")


def test_an_agent_dying_mid_stream_is_restarted_and_the_stream_goes_on(qwen_tiny: Path, e2e_dir: Path) -> None:
    """`potluck up` restarts a dead agent (with backoff) and serves on the others meanwhile: the
    stream whose home died is replayed on them and ends as an undisturbed run does."""
    server: PotluckUp = start_up(qwen_tiny, e2e_dir)
    # The request's home: agent0, the first agent of an idle cluster (choose_home).
    home = next(pid for pid in server.agents if b"agent0" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))
    try:
        body = {**LONG, "model": "qwen3_moe", "stream": True}
        want = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as reply:
            lines = reply.iter_lines()
            first = next(line for line in lines if '"content":"' in line and '"role"' not in line)
            os.kill(home, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line[len("data: "):]) for line in [first, *rest[:-1]]]
        assert not any("error" in c for c in chunks), chunks[-1]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        assert text == want["choices"][0]["message"]["content"]
        log = server.log_tail(200)
        assert "agent agent0 exited" in log and "restarting it" in log, log
        deadline = time.monotonic() + 120
        while not all(a["up"] for a in httpx.get(f"{server.url}/admin/status", timeout=10).json()["agents"]):
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.3)
        assert server.proc.poll() is None
        server.agents = children_of(server.proc.pid)  # the restarted agent0 is a new process
    finally:
        assert server.stop() == 0


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
