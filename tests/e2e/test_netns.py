"""Agents on two sides of a real (virtual) network: one in the test's own network namespace, one
in the host's, the server in the host's, mutual TLS over the link between them. The link delays
every packet by 2 ms and drops 1% of them: a veth pair with the netem qdisc where the kernel has
it, else a TUN pair with the same delay and loss applied by a relay in this process
(`lossy_link`; this project's development kernel has no netem). Prefill is sequence-parallel (K/V
and expert batches cross the link, and lost packets are resent by TCP) and the output equals a
loopback cluster's, greedy and seeded."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from server.launcher import free_port
from tests.e2e.conftest import AGENT_ENV, Agent, certs, potluck_command, start_up
from tests.e2e.lossy_link import LossyLink
from tests.e2e.test_inventory_reload import until

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="network namespaces need root and iproute2")

PROMPT = list(range(7, 67))


def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@dataclass
class Link:
    netns: str
    host: str  # the host side's address
    ns: str  # the namespace side's address
    relay: LossyLink | None  # None: a veth pair with netem


DELAY, LOSS = "2ms", "1%"


@pytest.fixture
def link() -> Iterator[Link]:
    n = os.getpid() % 200 + 10
    name, prefix = f"potluck-t{n}", f"plk{n}"
    host, ns = f"10.251.{n}.1", f"10.251.{n}.2"
    relay = None
    try:
        for step in (("ip", "netns", "add", name), ("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")):
            done = sh(*step)
            assert done.returncode == 0, f"{' '.join(step)}: {done.stderr}"
        if _veth_with_netem(name, prefix, host, ns):
            print(f"veth pair with netem delay {DELAY} loss {LOSS}")
        else:
            relay = LossyLink(prefix, name, host, ns, delay_s=0.002, loss=0.01, seed=1)
            print(f"no netem on this kernel: TUN pair, {DELAY} delay and {LOSS} loss by a relay")
        yield Link(name, host, ns, relay)
    finally:
        if relay is not None:
            relay.close()
            print(f"the relay carried {relay.packets} packets and dropped {relay.dropped}")
        sh("ip", "link", "del", f"{prefix}a")
        sh("ip", "netns", "del", name)


def _veth_with_netem(netns: str, prefix: str, host: str, ns: str) -> bool:
    """A veth pair whose both ends delay and drop packets; False (and no pair) without netem."""
    outer, inner = f"{prefix}a", f"{prefix}b"
    steps = [("ip", "link", "add", outer, "type", "veth", "peer", "name", inner),
             ("ip", "link", "set", inner, "netns", netns), ("ip", "addr", "add", f"{host}/30", "dev", outer),
             ("ip", "link", "set", outer, "up"),
             ("ip", "netns", "exec", netns, "ip", "addr", "add", f"{ns}/30", "dev", inner),
             ("ip", "netns", "exec", netns, "ip", "link", "set", inner, "up")]
    for step in steps:
        done = sh(*step)
        assert done.returncode == 0, f"{' '.join(step)}: {done.stderr}"
    netem = ("netem", "delay", DELAY, "loss", LOSS)
    if sh("tc", "qdisc", "add", "dev", outer, "root", *netem).returncode != 0:
        sh("ip", "link", "del", outer)
        return False
    inside = sh("ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", inner, "root", *netem)
    assert inside.returncode == 0, inside.stderr
    return True


def complete(url: str, model: str, seed: int | None) -> str:
    sampling = {"temperature": 0} if seed is None else {"temperature": 0.9, "top_p": 0.95, "seed": seed}
    reply = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 24,
                                                      "ignore_eos": True, **sampling}, timeout=120)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["text"])


def test_agents_across_a_lossy_link_give_the_loopback_output(link: Link, qwen_tiny: Path, tmp_path: Path) -> None:
    loopback = start_up(qwen_tiny, tmp_path, "--home-prefill-max", "0")
    try:
        want = [complete(loopback.url, qwen_tiny.name, seed) for seed in (None, 5)]
    finally:
        assert loopback.stop() == 0
    agents = [Agent(tmp_path, qwen_tiny, "near", free_port(), host=link.host),
              Agent(tmp_path, qwen_tiny, "far", free_port(), host=link.ns, wrap=("ip", "netns", "exec", link.netns))]
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
        if link.relay is not None:  # seed 1 drops the 14th packet: well before the first prefill is done
            assert link.relay.dropped > 0, f"{link.relay.packets} packets crossed the link and none was dropped"
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        for agent in agents:
            agent.stop()
