"""`potluck bench prefill`: time-to-first-token of real local clusters, per policy and agent count.

Every case is a fresh cluster started with `potluck up --inventory` (agents are child processes
with an emulated device profile each, talking real gRPC) and driven through `/v1/completions`
with `max_tokens=1`, streamed, so TTFT is the time to the first chunk. Per case: the cold request
(fresh cluster), then five distinct prompts whose last four give the warm median. Agents'
counters (bytes read, attention seconds, prefetch recall per expert and per (token, expert) pair)
are read over gRPC around each request.

Each agent emulates a device: expert memory, disk and link rates, and a compute speed of
`--compute-share` of one host core (its compute thread is paced by CPU time, so four agents on
a 2-core host compute like four devices rather than four slices of two cores, and compute pools
across agents as it does across a LAN). The profile makes the `bench` model I/O-bound like
Mixtral on edge devices: the disk rate is chosen so that reading every expert once takes
`--io-ratio` times a 2048-token prefill by one agent with all experts resident (measured first).
The lower bound of a request on N agents is the larger of (bytes of its experts not resident
anywhere) / (N disk rates) and that one-agent compute / N. Agents count the compute that ran past
their share (the host could not carry the emulation); each case reports the worst request's share.
A single run of a case scatters by about as much as the host drifts, so `--rounds N` runs every
case, the one-agent baseline too, N times (fresh clusters, each with its own calibration) and
reports the medians with every round's efficiencies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from node_agent.model.reference import LocalModel
from scheduler.client import AgentClient
from scheduler.cost_model import lower_bound_s
from scheduler.policy import Policy
from scheduler.types import AgentSnapshot, NodeId, NodeSpec
from server.bench import default_bench_model
from protos.security import Credentials
from server.certs import SERVER_FOLDER, enrol
from server.launcher import die_with_parent, free_ports, stop_process
from server.bench_report import write_report

LINK = "1Gbit/s"
NO_REPLAN_S = 86400.0  # --replan-every of a benchmark cluster that does not measure placement: a day
LINK_BYTES_PER_S = 125e6
ABLATIONS = {
    "sirius": Policy.from_flags("sirius"),
    "naive": Policy.from_flags("naive"),
    "expert-parallel": Policy.from_flags("expert-parallel"),
    "sirius--no-interleave": Policy.from_flags("sirius", no_interleave=True),
    "sirius--no-token-scheduling": Policy.from_flags("sirius", no_token_scheduling=True),
    "sirius--no-prefetch": Policy.from_flags("sirius", no_prefetch=True),
    "sirius--no-fill": Policy.from_flags("sirius", no_fill=True),  # not one of the techniques
}


@dataclass
class Request:
    ttft_s: float
    bytes_read: int  # read from disk by all agents during the request
    must_read_bytes: int  # experts it activated that no agent held when it started
    lower_bound_s: float
    attention_s: dict[str, float]  # per agent
    predicted_used: int  # experts used that the previous layer's prediction named, all agents
    used: int  # experts used in layers that had a prediction, all agents
    compute_overrun_s: dict[str, float] = field(default_factory=dict)  # per agent: past its share
    predicted_pairs_used: int = 0  # (token, slot) pairs whose expert the prediction named, all agents
    pairs_used: int = 0  # (token, slot) pairs in layers that had a prediction, all agents (0: not counted)
    cpu_s: float = 0.0  # CPU seconds of the agents' processes during the request, all agents
    paced_cpu_s: float = 0.0  # of which paced to their compute share
    split_experts: int = 0  # (layer, expert) runs of the owners' tokens split into slices, all agents

    @property
    def efficiency(self) -> float:
        return self.lower_bound_s / self.ttft_s

    @property
    def unpaced(self) -> float | None:
        """The share of the agents' CPU during the request that no pacing slowed (event loops,
        gRPC, messaging: they run at the host's speed, not the emulated device's); None if
        not counted."""
        return 1.0 - self.paced_cpu_s / self.cpu_s if self.cpu_s > 0 else None

    @property
    def overrun(self) -> float:
        """The worst agent's compute past its emulated speed, as a fraction of the TTFT."""
        return max(self.compute_overrun_s.values(), default=0.0) / self.ttft_s


@dataclass
class Case:
    policy: str
    agents: int
    tokens: int
    cold: Request | None = None
    warm: list[Request] = field(default_factory=list)  # the measured ones (after the first)

    def summary(self) -> dict[str, float | int | str | None]:
        assert self.cold is not None
        warm_ttft = statistics.median(r.ttft_s for r in self.warm)
        warm_bound = statistics.median(r.lower_bound_s for r in self.warm)
        att = [r.attention_s for r in [self.cold, *self.warm]]
        balance = statistics.median(max(a.values()) / (sum(a.values()) / len(a)) for a in att if a and sum(a.values()))
        used = sum(r.used for r in [self.cold, *self.warm])
        hit = sum(r.predicted_used for r in [self.cold, *self.warm])
        pairs = sum(r.pairs_used for r in [self.cold, *self.warm])
        pair_hits = sum(r.predicted_pairs_used for r in [self.cold, *self.warm])
        return {
            "policy": self.policy, "agents": self.agents, "tokens": self.tokens,
            "cold_ttft_s": self.cold.ttft_s, "warm_ttft_s": warm_ttft,
            "cold_lower_bound_s": self.cold.lower_bound_s, "warm_lower_bound_s": warm_bound,
            "cold_efficiency": self.cold.efficiency, "warm_efficiency": warm_bound / warm_ttft,
            "cold_read_mb": self.cold.bytes_read / 1e6,
            "warm_read_mb": statistics.median(r.bytes_read for r in self.warm) / 1e6,
            # Recall is None (n/a in the report) where nothing was predicted, or not counted.
            "attention_max_over_mean": balance, "prefetch_recall": hit / used if used else None,
            "prefetch_pair_recall": pair_hits / pairs if pairs else None,
            "compute_overrun": max(r.overrun for r in [self.cold, *self.warm]),
            "unpaced_cpu_share": max((u for r in [self.cold, *self.warm] if (u := r.unpaced) is not None), default=None),
            "cold_split_experts": self.cold.split_experts,
            "warm_split_experts": statistics.median(r.split_experts for r in self.warm),
        }


async def wait_healthy(proc: subprocess.Popen[bytes], cmd: list[str], url: str, timeout_s: float = 300.0) -> None:
    """Until `potluck up` (`proc`, started as `cmd`) answers GET /health at `url` with 200."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}")
            try:
                if (await http.get(f"{url}/health", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bench cluster did not become healthy in {timeout_s:.0f} s")
            await asyncio.sleep(0.5)


class Cluster:
    """`potluck up --inventory` in a child process, and gRPC clients to its agents."""

    def __init__(self, model_dir: Path, workdir: Path, agents: int, policy: Policy, memory: int, disk_rate: float,
                 compute_share: float, link: str = LINK) -> None:
        self.port, *agent_ports = free_ports(agents + 1)
        self.specs = [NodeSpec(NodeId(f"agent{i}"), f"127.0.0.1:{port}") for i, port in enumerate(agent_ports)]
        inventory = workdir / f"inventory-{self.port}.yaml"
        nodes = "".join(
            f"  - name: {s.name}\n    address: {s.address}\n    expert_memory: {memory or 'unlimited'}\n"
            f"    disk_bandwidth: {disk_rate or 'unlimited'}\n    link_bandwidth: {link}\n"
            f"    compute_share: {compute_share}\n"
            for s in self.specs
        )
        inventory.write_text("nodes:\n" + nodes)
        # The cluster's own enrolment, so that this bench can ask the agents for their counters.
        self.certs = workdir / f"certs-{self.port}"
        enrol(self.certs, [s.name for s in self.specs], days=1)
        flags = [f"--no-{f}" for f, on in (("interleave", policy.interleave), ("token-scheduling", policy.token_scheduling),
                                           ("prefetch", policy.prefetch)) if not on and policy.name == "sirius"]
        flags += ["--no-fill"] if not policy.fill and policy.name != "naive" else []
        self.cmd = [sys.executable, "-m", "server.cli", "up", "--inventory", str(inventory), "--model", str(model_dir),
                    "--port", str(self.port), "--served-model-name", "bench", "--policy", policy.name, *flags,
                    "--home-prefill-max", "0", "--log-level", "WARNING",  # the policies' sequence-parallel prefill
                    # Placement is not what this measures: no replan moves experts between rounds.
                    "--replan-every", str(NO_REPLAN_S), "--certs", str(self.certs)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.clients: list[AgentClient] = []

    async def __aenter__(self) -> Cluster:
        # Killed outright, the bench takes its cluster with it (`potluck up` in turn takes its agents).
        self.proc = subprocess.Popen(self.cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=die_with_parent)
        await wait_healthy(self.proc, self.cmd, self.url)
        creds = Credentials.load(self.certs / SERVER_FOLDER)
        self.clients = [AgentClient(s, creds=creds) for s in self.specs]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for c in self.clients:
            await c.close()
        if self.proc is not None:
            stop_process(self.proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def snapshots(self) -> list[AgentSnapshot]:
        return [await c.snapshot() for c in self.clients]

    async def resident(self) -> set[tuple[int, int]]:
        out: set[tuple[int, int]] = set()
        for c in self.clients:
            experts = (await c.info()).num_experts
            out |= {(i // experts, i % experts) for i in await c.resident()}
        return out

    async def ttft(self, prompt: list[int]) -> float:
        body = {"model": "bench", "prompt": prompt, "max_tokens": 1, "stream": True, "temperature": 0}
        async with httpx.AsyncClient(timeout=600) as http:
            start = time.perf_counter()
            async with http.stream("POST", f"{self.url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"bench request failed: {response.status_code} {(await response.aread())[:300]!r}")
                ttft = None
                async for line in response.aiter_lines():  # read to the end: the request completes
                    if ttft is None and line.startswith("data: ") and '"choices"' in line:
                        ttft = time.perf_counter() - start
        if ttft is None:
            raise RuntimeError("the stream ended without a token")
        return ttft


async def measure(cluster: Cluster, prompt: list[int], activated: set[tuple[int, int]], expert_file_bytes: int,
                  disk_rate: float, compute_s: float) -> Request:
    before, held = await cluster.snapshots(), await cluster.resident()
    ttft = await cluster.ttft(prompt)
    after = await cluster.snapshots()
    must = len(activated - held) * expert_file_bytes
    agents = len(cluster.specs)
    pooled_disk = disk_rate * agents if disk_rate else 0.0
    return Request(
        ttft_s=ttft,
        bytes_read=sum(a.bytes_read - b.bytes_read for a, b in zip(after, before)),
        must_read_bytes=must,
        lower_bound_s=lower_bound_s(must, pooled_disk, compute_s / agents),
        attention_s={a.name: a.attention_s - b.attention_s for a, b in zip(after, before)},
        predicted_used=sum(a.predicted_used - b.predicted_used for a, b in zip(after, before)),
        used=sum(a.used - b.used for a, b in zip(after, before)),
        predicted_pairs_used=sum(a.predicted_pairs_used - b.predicted_pairs_used for a, b in zip(after, before)),
        pairs_used=sum(a.pairs_used - b.pairs_used for a, b in zip(after, before)),
        compute_overrun_s={a.name: a.compute_overrun_s - b.compute_overrun_s for a, b in zip(after, before)},
        cpu_s=sum(a.cpu_s - b.cpu_s for a, b in zip(after, before)),
        paced_cpu_s=sum(a.paced_cpu_s - b.paced_cpu_s for a, b in zip(after, before)),
        split_experts=sum(a.prefill_split_experts - b.prefill_split_experts for a, b in zip(after, before)),
    )


def over_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One case run several times (fresh clusters): the median of every figure (the worst compute
    overrun), the requests of a middle round by warm efficiency, and each round's figures
    (`rounds`, only if more than one).
    Efficiencies are medians of the rounds' own (each against the compute measured right before
    it), not a median TTFT over a median compute."""
    if len(rounds) == 1:
        return rounds[0]
    middle = sorted(rounds, key=lambda r: r["warm_efficiency"])[(len(rounds) - 1) // 2]
    # A figure a round could not measure (None: a recall with nothing predicted) is left out of
    # its median, and is None only if no round measured it.
    figures = [k for k in middle if any(isinstance(r.get(k), float) for r in rounds)]
    out = {**middle, **{k: _median([r.get(k) for r in rounds]) for k in figures}}
    if "compute_overrun" in out:  # the emulation check wants the worst request of all rounds
        out["compute_overrun"] = max(r["compute_overrun"] for r in rounds)
    out["rounds"] = [{k: r.get(k) for k in figures} for r in rounds]
    return out


def _median(values: list[Any]) -> float | None:
    known = [v for v in values if isinstance(v, int | float)]
    return statistics.median(known) if known else None


def prompts_for(tokens: int, vocab: int, count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (tokens,), generator=g).tolist() for _ in range(count)]


async def run_case(model_dir: Path, workdir: Path, policy_label: str, agents: int, tokens: int, prompts: list[list[int]],
                   activated: list[set[tuple[int, int]]], memory: int, disk_rate: float, compute_s: float,
                   expert_file_bytes: int, compute_share: float) -> Case:
    """compute_s: the prompt's one-agent compute with every expert resident (for the lower bound)."""
    case = Case(policy_label, agents, tokens)
    async with Cluster(model_dir, workdir, agents, ABLATIONS[policy_label], memory, disk_rate, compute_share) as cluster:
        for i, (prompt, act) in enumerate(zip(prompts, activated)):
            r = await measure(cluster, prompt, act, expert_file_bytes, disk_rate, compute_s)
            if i == 0:
                case.cold = r
            elif i >= 2:  # five warm prompts; the first of them only warms up
                case.warm.append(r)
    return case


def main(args: argparse.Namespace) -> int:
    model_dir = Path(args.model) if args.model else default_bench_model()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    ref = LocalModel(str(model_dir))
    layers, experts = ref.cfg.num_layers, ref.cfg.num_experts
    expert_file_bytes = ref.ckpt.nbytes(ref.cfg.expert_tensor_names(0, 0))
    total_expert_bytes = expert_file_bytes * layers * experts
    memory = int(total_expert_bytes * args.memory_fraction)
    lengths = [int(x) for x in args.lengths.split(",")]
    agent_counts = [int(x) for x in args.agents.split(",")]
    labels = list(ABLATIONS) if args.policies == "all" else args.policies.split(",")
    data: dict[str, object] = {"command": shlex.join(["potluck", *sys.argv[1:]]), "model": str(model_dir),
                               "expert_bytes_total": total_expert_bytes, "expert_memory_per_agent": memory,
                               "link": LINK, "cores": os.cpu_count(), "compute_share": args.compute_share,
                               "rounds": args.rounds, "calibrate": args.calibrate}
    prompts = {n: prompts_for(n, cfg["vocab_size"], 6, seed=n) for n in lengths}
    activated = {}
    for n in lengths:
        acts = []
        for p in prompts[n]:
            ref.forward(p)
            # The first token needs every layer's experts for every prompt token, except the last
            # layer, where only the final token's experts count (the agents skip the others).
            last = layers - 1
            acts.append({(l, e) for l, e in ref.last_routed if l != last} | {(last, e) for e in ref.last_token_routed})
        activated[n] = acts
    del ref
    with tempfile.TemporaryDirectory(prefix="potluck-bench-") as work:  # inventories of the clusters
        return _run(args, model_dir, out, Path(work), cfg, prompts, activated, lengths, agent_counts, labels, data,
                    memory, total_expert_bytes, expert_file_bytes)


def _run(args: argparse.Namespace, model_dir: Path, out: Path, work: Path, cfg: dict[str, int],
         prompts: dict[int, list[list[int]]], activated: dict[int, list[set[tuple[int, int]]]], lengths: list[int],
         agent_counts: list[int], labels: list[str], data: dict[str, object], memory: int, total_expert_bytes: int,
         expert_file_bytes: int) -> int:
    share = args.compute_share

    def calibrate(n: int) -> float:
        """One agent's compute of an n-token prefill: its compute share, every expert resident,
        no disk throttle (the warm median)."""
        case = asyncio.run(run_case(model_dir, work, "sirius", 1, n, prompts[n], activated[n], 0, 0.0, 0.0,
                                    expert_file_bytes, share))
        return statistics.median(r.ttft_s for r in case.warm)

    compute = {}
    for n in lengths:
        compute[n] = calibrate(n)
        print(f"compute of a {n}-token prefill, all experts resident, 1 agent at {share or 'all'} of a core: "
              f"{compute[n]:.2f} s", flush=True)
    ref_tokens = 2048 if 2048 in compute else lengths[0]
    disk_rate = args.disk_rate or total_expert_bytes / (args.io_ratio * compute[ref_tokens])
    read_all_s = total_expert_bytes / disk_rate
    print(f"disk {disk_rate / 1e6:.1f} MB/s per agent: reading all {total_expert_bytes / 1e6:.0f} MB of experts takes "
          f"{read_all_s:.1f} s = {read_all_s / compute[ref_tokens]:.1f}x the {ref_tokens}-token compute", flush=True)
    data.update({"compute_s": compute, "disk_bytes_per_s": disk_rate, "read_all_experts_s": read_all_s,
                 "io_ratio": read_all_s / compute[ref_tokens], "io_reference_tokens": ref_tokens})
    cases = []
    for n in lengths:
        for agents in agent_counts:
            for label in (labels if agents > 1 else ["sirius"]):  # one agent: the same baseline for all
                rounds = []
                # Every case, the one-agent baseline included, gets the same rounds and calibration:
                # the speedups divide its medians, and a baseline measured once would carry one
                # round's drift into every ratio.
                for _ in range(args.rounds):
                    # This host's speed drifts by 5-15% over minutes: the compute a case's lower
                    # bound divides is measured right before the case, not once for the whole run.
                    c1 = calibrate(n) if args.calibrate == "each" else compute[n]
                    case = asyncio.run(run_case(model_dir, work, label, agents, n, prompts[n], activated[n], memory,
                                                disk_rate, c1, expert_file_bytes, share))
                    s = {**case.summary(), "compute_s": c1}
                    rounds.append({**s, "cold": asdict(case.cold) if case.cold else None,
                                   "warm": [asdict(r) for r in case.warm]})
                    print(f"{label:28} agents={agents} tokens={n}: 1-agent compute {c1:.2f}s, "
                          f"cold {s['cold_ttft_s']:.2f}s warm {s['warm_ttft_s']:.2f}s "
                          f"eff {s['cold_efficiency']:.2f}/{s['warm_efficiency']:.2f} "
                          f"balance {s['attention_max_over_mean']:.2f} recall {_fraction(s['prefetch_recall'])} "
                          f"(pairs {_fraction(s['prefetch_pair_recall'])}) split {s['cold_split_experts']}/"
                          f"{s['warm_split_experts']:.0f}", flush=True)
                cases.append(over_rounds(rounds))
    data["cases"] = cases
    (out / "prefill.json").write_text(json.dumps(data, indent=2))
    write_report(data, out)
    print(f"wrote {out / 'prefill.json'}, {out / 'prefill.md'}, {out / 'prefill.png'}")
    return 0


def _fraction(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else "n/a"
