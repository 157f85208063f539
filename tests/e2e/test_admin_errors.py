"""An admin's mistakes, made for real with the `potluck` command: each gets one or two lines
that say what is wrong and how to fix it, exit status 2, and no traceback.

The cases that need an agent share one real agent process (the tiny model, loopback).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from node_agent.model.synth import init_model
from server.launcher import free_port
from tests.e2e.conftest import START_TIMEOUT_S, Agent, certs, potluck_command

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "POTLUCK_API_KEY": ""}  # the server's; agents take conftest's
RUN_TIMEOUT_S = 120.0


def potluck(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*potluck_command(), *args], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=RUN_TIMEOUT_S)  # fmt: skip


def refused(done: subprocess.CompletedProcess[str], *expected: str) -> str:
    """The error a command printed, checked: status 2, no traceback, at most two lines on stderr
    (log lines and argparse's usage aside), every expected fragment in it."""
    assert done.returncode == 2, f"status {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    # Log lines start with a date; argparse's usage block (a flag's error) comes before its one line.
    error = [line for line in done.stderr.splitlines()
             if line.strip() and not line[:4].isdigit() and not line.startswith(("usage:", " "))]
    assert 1 <= len(error) <= 2, done.stderr
    text = "\n".join(error)
    for fragment in expected:
        assert fragment in text, text
    return text


def write_inventory(path: Path, nodes: list[dict[str, object]], **top: object) -> Path:
    path.write_text(yaml.safe_dump({**top, "nodes": nodes}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("admin")


@pytest.fixture(scope="module")
def agent(work: Path, qwen_tiny: Path) -> Iterator[Agent]:
    running = Agent(work, qwen_tiny, "agent0", free_port())
    yield running
    running.stop()


# Before anything starts ----------------------------------------------------------------------


def test_init_model_into_an_existing_folder(qwen_tiny: Path) -> None:
    refused(potluck("init-model", "--arch", "qwen3_moe", "--out", str(qwen_tiny)),
            "already exists and is not an empty folder")  # fmt: skip


@pytest.mark.parametrize(("flags", "message"), [
    (("--experts", "2", "--experts-per-token", "5"), "experts_per_token=5 exceeds experts=2"),
    (("--topics", "1"), "topics=1 must be 0 (none) or at least 2"),
])
def test_init_model_with_a_shape_it_cannot_build(work: Path, flags: tuple[str, ...], message: str) -> None:
    refused(potluck("init-model", "--arch", "qwen3_moe", "--out", str(work / "never"), *flags), message)
    assert not (work / "never").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "file", "no tokenizer"])
def test_serve_and_agent_with_a_bad_model_folder(case: str, work: Path, qwen_tiny: Path) -> None:
    folder = work / f"model-{case.replace(' ', '-')}"
    if case == "empty":
        folder.mkdir(exist_ok=True)
    elif case == "file":
        folder.write_text("not a folder")
    elif case == "no tokenizer":
        folder.mkdir(exist_ok=True)
        for f in qwen_tiny.iterdir():
            if not f.name.startswith("tokenizer"):
                (folder / f.name).write_bytes(f.read_bytes())
    why = {"missing": "no such folder", "empty": "an empty folder", "file": "not a folder",
           "no tokenizer": "lacks a tokenizer"}[case]  # fmt: skip
    inventory = write_inventory(work / "one.yaml", [{"name": "a", "address": "127.0.0.1:1", "expert_memory": 0}])
    refused(potluck("serve", "--model", str(folder), "--inventory", str(inventory)), f"--model {folder}", why)
    if case != "no tokenizer":  # an agent does not tokenize
        refused(potluck("agent", "--listen", "127.0.0.1:1", "--model", str(folder)), f"--model {folder}", why)


def test_ports_are_range_checked(qwen_tiny: Path, work: Path) -> None:
    refused(potluck("agent", "--listen", "localhost:99999", "--model", str(qwen_tiny)), "--listen", "port 1-65535")
    inventory = write_inventory(work / "one.yaml", [{"name": "a", "address": "127.0.0.1:1", "expert_memory": 0}])
    refused(potluck("serve", "--port", "80000", "--model", str(qwen_tiny), "--inventory", str(inventory)),
            "--port", "1-65535")  # fmt: skip


def test_every_inventory_error_is_shown(work: Path) -> None:
    inventory = write_inventory(work / "typo.yaml", [
        {"name": "a", "adress": "127.0.0.1:5000", "expert_memory": "1GiB"},
        {"name": "b", "address": "127.0.0.1:5001", "expert_memroy": "1GiB"},
    ])  # fmt: skip
    done = potluck("serve", "--inventory", str(inventory))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "2 errors" in done.stderr
    assert "nodes[0].adress (node 'a'): unknown field; did you mean 'address'?" in done.stderr
    assert "nodes[1].expert_memroy (node 'b'): unknown field; did you mean 'expert_memory'?" in done.stderr


def test_up_honours_the_inventory_model(work: Path) -> None:
    inventory = write_inventory(work / "model.yaml", [{"name": "a", "address": "127.0.0.1:1", "expert_memory": 0}],
                                model="no-such-model")  # fmt: skip
    refused(potluck("up", "--inventory", str(inventory), "--port", str(free_port())), "model:", "no such folder")


def test_serve_with_no_agent_running(work: Path, qwen_tiny: Path) -> None:
    port = free_port()
    inventory = write_inventory(work / "none.yaml", [{"name": "ghost", "address": f"127.0.0.1:{port}",
                                                      "expert_memory": 0}])  # fmt: skip
    text = refused(potluck("serve", "--model", str(qwen_tiny), "--inventory", str(inventory), "--port",
                           str(free_port()), "--certs", str(certs(work))),
                   f"ghost at 127.0.0.1:{port}: unreachable (connection refused)")  # fmt: skip
    assert "start each agent first" in text


# With an agent running -------------------------------------------------------------------------


def test_a_second_agent_on_a_taken_port_is_refused(agent: Agent, qwen_tiny: Path) -> None:
    refused(potluck("agent", "--name", "twin", "--listen", agent.address, "--model", str(qwen_tiny), "--insecure"),
            f"port {agent.address.rpartition(':')[2]} on 127.0.0.1 is already in use")  # fmt: skip


def test_an_agent_named_otherwise_is_refused_with_both_names(agent: Agent, qwen_tiny: Path, work: Path) -> None:
    inventory = write_inventory(work / "desktop.yaml", [{"name": "desktop", "address": agent.address,
                                                         "expert_memory": 0}])  # fmt: skip
    refused(potluck("serve", "--model", str(qwen_tiny), "--inventory", str(inventory), "--port", str(free_port()),
                    "--certs", str(certs(work, "desktop"))),
            f"the agent at {agent.address} is named 'agent0' but the inventory names 'desktop'",
            "--name desktop")  # fmt: skip


def test_an_agent_with_another_checkpoint_is_refused(agent: Agent, work: Path) -> None:
    other = init_model("qwen3_moe", work / "other-seed", "tiny", seed=12)  # the same shape, other weights
    inventory = write_inventory(work / "other.yaml", [{"name": "agent0", "address": agent.address,
                                                       "expert_memory": 0}])  # fmt: skip
    refused(potluck("serve", "--model", str(other), "--inventory", str(inventory), "--port", str(free_port()),
                    "--certs", str(agent.certs)),
            "agent agent0 serves another checkpoint (fingerprint", "give the agent the same model folder")


def test_an_unreachable_node_makes_health_degraded(agent: Agent, qwen_tiny: Path, work: Path) -> None:
    ghost = f"127.0.0.1:{free_port()}"
    inventory = write_inventory(work / "degraded.yaml", [
        {"name": "agent0", "address": agent.address, "expert_memory": "1GiB"},  # the agent runs unlimited
        {"name": "ghost", "address": ghost, "expert_memory": 0},
    ])  # fmt: skip
    port, log = free_port(), work / "serve-degraded.log"
    with log.open("wb") as out:
        serve = subprocess.Popen([*potluck_command(), "serve", "--model", str(qwen_tiny), "--inventory",
                                  str(inventory), "--port", str(port), "--certs", str(certs(work, "ghost"))],
                                 stdout=out, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline, health = time.monotonic() + START_TIMEOUT_S, None
        while health is None:
            assert serve.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health.status_code == 200, health.text
        body = health.json()
        assert body["status"] == "degraded"
        down = [a for a in body["agents"] if not a["up"]]
        assert [(a["name"], a["address"]) for a in down] == [("ghost", ghost)]
        assert down[0]["problem"] == "unreachable (connection refused)"
        text = log.read_text()
        assert ("agent agent0 runs with expert memory unlimited but the inventory gives it 1 GiB: restart it with "
                "--expert-memory 1GiB") in text
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
