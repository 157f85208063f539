"""Agents on two sides of a real (virtual) network: one in the test's own network namespace behind
a veth pair, one in the host's, the server in the host's, mutual TLS over the veth link. Prefill
is sequence-parallel (K/V and expert batches cross the link) and the output equals a loopback
cluster's, greedy and seeded. Where the kernel has the netem qdisc, the link also delays every
packet by 2 ms and drops 1% of them; this project's development kernel has no netem (the test
says so in its output), and the link is then a plain veth pair."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from server.launcher import free_port
from tests.e2e.conftest import AGENT_ENV, Agent, certs, potluck_command, start_up
from tests.e2e.test_inventory_reload import until

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="network namespaces need root and iproute2")

PROMPT = list(range(7, 67))


def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str, bool]]:
    """(namespace, host-side address, namespace-side address, netem applied)."""
    n = os.getpid() % 200 + 10
    name, outer, inner = f"potluck-t{n}", f"plk{n}a", f"plk{n}b"
    host, ns = f"10.251.{n}.1", f"10.251.{n}.2"
    steps = [("ip", "netns", "add", name), ("ip", "link", "add", outer, "type", "veth", "peer", "name", inner),
             ("ip", "link", "set", inner, "netns", name), ("ip", "addr", "add", f"{host}/30", "dev", outer),
             ("ip", "link", "set", outer, "up"), ("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"),
             ("ip", "netns", "exec", name, "ip", "addr", "add", f"{ns}/30", "dev", inner),
             ("ip", "netns", "exec", name, "ip", "link", "set", inner, "up")]
    try:
        for step in steps:
            done = sh(*step)
            assert done.returncode == 0, f"{' '.join(step)}: {done.stderr}"
        netem = sh("tc", "qdisc", "add", "dev", outer, "root", "netem", "delay", "2ms", "loss", "1%")
        if netem.returncode == 0:
            sh("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", inner, "root", "netem", "delay", "2ms",
               "loss", "1%")
        else:
            print(f"no netem on this kernel ({netem.stderr.strip()}): a plain veth link")
        yield name, host, ns, netem.returncode == 0
    finally:
        sh("ip", "link", "del", outer)
        sh("ip", "netns", "del", name)


def complete(url: str, model: str, seed: int | None) -> str:
    sampling = {"temperature": 0} if seed is None else {"temperature": 0.9, "top_p": 0.95, "seed": seed}
    reply = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 24,
                                                      "ignore_eos": True, **sampling}, timeout=120)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["text"])


def test_agents_across_a_veth_link_give_the_loopback_output(netns: tuple[str, str, str, bool], qwen_tiny: Path,
                                                            tmp_path: Path) -> None:
    name, host, ns, _ = netns
    loopback = start_up(qwen_tiny, tmp_path, "--home-prefill-max", "0")
    try:
        want = [complete(loopback.url, qwen_tiny.name, seed) for seed in (None, 5)]
    finally:
        assert loopback.stop() == 0
    agents = [Agent(tmp_path, qwen_tiny, "near", free_port(), host=host),
              Agent(tmp_path, qwen_tiny, "far", free_port(), host=ns, wrap=("ip", "netns", "exec", name))]
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump({"nodes": [{"name": a.name, "address": a.address, "expert_memory": 0}
                                                   for a in agents]}))
    port, log = free_port(), tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen([*potluck_command(), "serve", "--model", str(qwen_tiny), "--inventory", str(inventory),
                                  "--port", str(port), "--certs", str(certs(tmp_path)), "--home-prefill-max", "0"],
                                 stdout=out, stderr=subprocess.STDOUT, env=AGENT_ENV)
    url = f"http://127.0.0.1:{port}"
    try:
        until("both agents up", lambda: all(a["up"] for a in httpx.get(f"{url}/admin/status", timeout=10)
                                            .json()["agents"]), log)
        got = [complete(url, qwen_tiny.name, seed) for seed in (None, 5)]
        assert got == want
        # The prefill's K/V and expert batches crossed the link (counters refresh at the polls).
        until("traffic both ways", lambda: all(a["link_sent_bytes"] > 0 for a in
                                              httpx.get(f"{url}/admin/status", timeout=10).json()["agents"]), log)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        for agent in agents:
            agent.stop()
