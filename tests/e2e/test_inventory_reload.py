"""`potluck serve` takes inventory changes without a restart: a node added to the file joins, a
node removed on SIGHUP is drained, a broken file keeps the running inventory. Real agent
processes, the real server, its admin status endpoint."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from server.launcher import free_port
from tests.e2e.conftest import AGENT_ENV, START_TIMEOUT_S, Agent, potluck_command


def write(path: Path, agents: list[Agent]) -> None:
    nodes = [{"name": a.name, "address": a.address, "expert_memory": 0} for a in agents]
    path.write_text(yaml.safe_dump({"nodes": nodes}, sort_keys=False))


def until(what: str, check: Callable[[], Any], log: Path) -> Any:
    """Polls `check` (the server refreshes its view every 2 s) until it returns something truthy."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if found := check():
                return found
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{what} did not happen:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


@pytest.fixture
def agents(tmp_path: Path, qwen_tiny: Path) -> Iterator[list[Agent]]:
    running = [Agent(tmp_path, qwen_tiny, name, free_port()) for name in ("agent0", "agent1")]
    yield running
    for agent in running:
        agent.stop()


def test_nodes_join_drain_and_a_broken_file_is_refused(agents: list[Agent], qwen_tiny: Path, tmp_path: Path) -> None:
    inventory, log, port = tmp_path / "inventory.yaml", tmp_path / "serve.log", free_port()
    write(inventory, agents[:1])
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        serve = subprocess.Popen([*potluck_command(), "serve", "--model", str(qwen_tiny), "--inventory", str(inventory),
                                  "--port", str(port), "--certs", str(agents[0].certs)], stdout=out,
                                 stderr=subprocess.STDOUT, env=AGENT_ENV)  # fmt: skip

    def up() -> set[str]:
        return {a["name"] for a in httpx.get(f"{url}/admin/status", timeout=5).json()["agents"] if a["up"]}

    def complete() -> str:
        reply = httpx.post(f"{url}/v1/completions", json={"model": qwen_tiny.name, "prompt": [1, 2, 3],
                                                           "max_tokens": 4, "temperature": 0}, timeout=60)  # fmt: skip
        assert reply.status_code == 200, reply.text
        return str(reply.json()["choices"][0]["text"])

    try:
        until("the server starting", lambda: up() == {"agent0"}, log)
        alone = complete()
        write(inventory, agents)  # the file changes: agent1 joins, no signal needed
        until("agent1 joining", lambda: up() == {"agent0", "agent1"}, log)
        assert "inventory" in log.read_text() and "added agent1; draining none" in log.read_text()
        assert complete() == alone  # greedy: the same text on one agent or two
        write(inventory, agents[1:])
        serve.send_signal(signal.SIGHUP)
        until("agent0 being drained", lambda: up() == {"agent1"}, log)
        until("agent0 leaving", lambda: "agent agent0 drained and removed" in log.read_text(), log)
        assert complete() == alone
        inventory.write_text("nodes: [\n")  # broken YAML: refused, the running nodes stay
        until("the broken file being refused", lambda: "inventory not reloaded" in log.read_text(), log)
        assert up() == {"agent1"} and complete() == alone
        assert serve.poll() is None
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
