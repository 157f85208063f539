"""Faults injected into real processes: three `potluck agent`s and a `potluck serve`, the tiny
model, loopback. An agent killed (SIGKILL) or stopped (SIGSTOP) while it is a streaming request's
home: the stream pauses, then goes on with exactly the tokens of an undisturbed run (greedy, or
seeded); a restarted agent rejoins; a stopped one that resumes rejoins."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from server.launcher import free_port
from tests.e2e.conftest import AGENT_ENV, START_TIMEOUT_S, Agent, certs, potluck_command
from tests.e2e.test_inventory_reload import until

# Each decode step's reply waits out this emulated latency, so that a 120-token stream lasts long
# enough (a few seconds) for the test to find its home and act while it runs.
LATENCY = "15ms"
TOKENS = 120


class Cluster:
    def __init__(self, work: Path, model: Path) -> None:
        self.work, self.model = work, model
        self.agents = [Agent(work, model, f"agent{i}", free_port(), "--link-latency", LATENCY) for i in range(3)]
        inventory = work / "inventory.yaml"
        inventory.write_text(yaml.safe_dump({"nodes": [{"name": a.name, "address": a.address, "expert_memory": 0,
                                                        "link_latency": LATENCY} for a in self.agents]}))
        self.inventory = inventory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "serve.log"
        self.start_server()

    def start_server(self) -> None:
        with self.log.open("ab") as out:
            self.serve = subprocess.Popen([*potluck_command(), "serve", "--model", str(self.model), "--inventory",
                                           str(self.inventory), "--port", str(self.port), "--certs",
                                           str(certs(self.work))], stdout=out, stderr=subprocess.STDOUT, env=AGENT_ENV)
        until("every agent up", lambda: len(self.up()) == 3, self.log)

    def status(self) -> dict[str, dict[str, object]]:
        agents = httpx.get(f"{self.url}/admin/status", timeout=10).json()["agents"]
        return {a["name"]: a for a in agents}

    def up(self) -> set[str]:
        return {n for n, a in self.status().items() if a["up"]}

    def restart(self, i: int) -> None:
        old = self.agents[i]
        self.agents[i] = Agent(self.work, self.model, old.name, int(old.address.rpartition(":")[2]),
                               "--link-latency", LATENCY)

    def stop(self) -> None:
        self.serve.send_signal(signal.SIGTERM)
        self.serve.wait(60)
        for agent in self.agents:
            os.kill(agent.proc.pid, signal.SIGCONT)
            agent.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, qwen_tiny: Path) -> Iterator[Cluster]:
    running = Cluster(tmp_path_factory.mktemp("faults"), qwen_tiny)
    yield running
    running.stop()


def body(seed: int | None) -> dict[str, object]:
    sampling = {"temperature": 0} if seed is None else {"temperature": 0.9, "top_p": 0.95, "seed": seed}
    return {"model": "qwen3_moe", "prompt": list(range(5, 45)), "max_tokens": TOKENS, "stream": True,
            "ignore_eos": True, **sampling}


def stream(cluster: Cluster, seed: int | None, fault: str | None = None) -> tuple[list[str], float]:
    """The stream's text pieces and its longest pause; with `fault`, the request's home gets that
    signal once a few pieces have come."""
    pieces: list[str] = []
    gaps, last, victim = [0.0], time.monotonic(), None
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body(seed), timeout=120) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            pieces.append(chunk["choices"][0]["text"])
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            if fault is not None and victim is None and len(pieces) == 5:
                victim = home_of(cluster)
                os.kill(victim.proc.pid, getattr(signal, fault))
    return pieces, max(gaps)


def home_of(cluster: Cluster) -> Agent:
    """The agent holding the one running request (the scheduler's view refreshes every 2 s)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        holding = [n for n, a in cluster.status().items() if a["up"] and int(str(a["requests"])) > 0]
        if len(holding) == 1:
            return next(a for a in cluster.agents if a.name == holding[0])
        assert time.monotonic() < deadline, "no single agent holds the request"
        time.sleep(0.1)


@pytest.mark.parametrize("fault,seed", [("SIGKILL", None), ("SIGSTOP", 77)], ids=["killed-greedy", "stopped-seeded"])
def test_a_stream_outlives_its_home(cluster: Cluster, fault: str, seed: int | None) -> None:
    want, _ = stream(cluster, seed)
    got, pause = stream(cluster, seed, fault)
    assert "".join(got) == "".join(want)  # (tokens that arrive together may share a chunk)
    assert pause < 60  # generous here (a shared machine); the soak script reports the real pauses
    down = [n for n, a in cluster.status().items() if not a["up"]]
    assert len(down) == 1, cluster.status()
    victim = next(i for i, a in enumerate(cluster.agents) if a.name == down[0])
    if fault == "SIGKILL":  # restarted, it rejoins
        cluster.restart(victim)
    else:  # resumed, it rejoins
        os.kill(cluster.agents[victim].proc.pid, signal.SIGCONT)
    until(f"{down[0]} back", lambda: len(cluster.up()) == 3, cluster.log)
    again, _ = stream(cluster, seed)
    assert "".join(again) == "".join(want)


def test_a_restarted_server_serves_the_same_agents(cluster: Cluster) -> None:
    """The server killed mid-stream (the client sees the stream cut) and started again: the agents
    take it back (the old run's state expires at its time to live) and a request gives the same
    text as before."""
    want, _ = stream(cluster, None)
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body(None), timeout=120) as reply:
        lines = reply.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        cluster.serve.send_signal(signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            for _ in lines:
                pass
    cluster.serve.wait(30)
    cluster.start_server()
    again, _ = stream(cluster, None)
    assert "".join(again) == "".join(want)
