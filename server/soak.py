"""A bounded soak under faults: agents and a server as processes (mutual TLS, loopback),
concurrent streaming clients, and, `--fault-every` seconds after the last fault ended, one agent
killed (SIGKILL, started again `--down` seconds later) or stopped (SIGSTOP, resumed `--down`
seconds later), in turn.

Every request's text is compared with an undisturbed run of the same prompt and sampling (greedy
or seeded), made before the first fault. The report counts requests that completed identical,
that ended with a clean error (an error event in OpenAI's shape, or an HTTP error status), that
were lost (a different text, or a stream that ended without [DONE]) and that hung (nothing for
`--hang` seconds); the longest pause of each stream that lived through a fault, by kind; and the
memory (RSS) of the server and of the agents at the start and at the end. A stream counts as
living through a fault when it runs while the agent is dead or stopped (it may have begun after
the signal, on an agent not found down yet); a pause includes the wait for the first token.

    python -m server.soak --minutes 15 --agents 3 --clients 4 --out bench-out

Exit status 0 when nothing was lost and nothing hung, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from server.certs import enrol
from server.launcher import die_with_parent, free_ports

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "POTLUCK_API_KEY": ""}


@dataclass
class Outcome:
    kind: str  # identical | clean-error | lost | hung
    pause_s: float  # the longest gap between two events of the stream
    start: float
    end: float
    detail: str = ""


@dataclass
class Fault:
    kind: str  # SIGKILL | SIGSTOP
    agent: str
    at: float


@dataclass
class Soak:
    work: Path
    model: Path
    agents: int
    latency: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    server: subprocess.Popen[bytes] | None = None
    url: str = ""

    def start(self) -> None:
        ports = free_ports(self.agents + 1)
        names = [f"agent{i}" for i in range(self.agents)]
        self.addresses = {n: f"127.0.0.1:{p}" for n, p in zip(names, ports)}
        enrol(self.work / "certs", names, days=1)
        inventory = self.work / "inventory.yaml"
        inventory.write_text(yaml.safe_dump({"nodes": [{"name": n, "address": a, "expert_memory": 0,
                                                        "link_latency": self.latency}
                                                       for n, a in self.addresses.items()]}))
        for name in names:
            self.start_agent(name)
        self.url = f"http://127.0.0.1:{ports[-1]}"
        self.server = self._spawn("serve", [*self._cli(), "serve", "--model", str(self.model), "--inventory",
                                            str(inventory), "--port", str(ports[-1]), "--certs",
                                            str(self.work / "certs"), "--log-level", "WARNING"])

    def start_agent(self, name: str) -> None:
        self.procs[name] = self._spawn(name, [*self._cli(), "agent", "--name", name, "--listen", self.addresses[name],
                                              "--model", str(self.model), "--certs", str(self.work / "certs"),
                                              "--link-latency", self.latency])

    def _cli(self) -> list[str]:
        return [sys.executable, "-m", "server.cli"]

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        with (self.work / f"{name}.log").open("ab") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, preexec_fn=die_with_parent)

    async def wait_all_up(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                try:
                    agents = (await http.get(f"{self.url}/admin/status")).json()["agents"]
                    if all(a["up"] for a in agents) and len(agents) == self.agents:
                        return
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster did not come up within {timeout_s:.0f} s (logs in {self.work})")
                await asyncio.sleep(0.5)

    def rss_mib(self) -> dict[str, float]:
        procs = {"server": self.server, **self.procs}
        return {n: _rss_mib(p.pid) for n, p in procs.items() if p is not None and p.poll() is None}

    def stop(self) -> None:
        for proc in [*self.procs.values(), self.server]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in [*self.procs.values(), self.server]:
            if proc is not None:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def request_body(model: str, prompt: list[int], seed: int | None, max_tokens: int) -> dict[str, object]:
    sampling = {"temperature": 0} if seed is None else {"temperature": 0.9, "top_p": 0.95, "seed": seed}
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            **sampling}


async def run_stream(http: httpx.AsyncClient, url: str, body: dict[str, object], hang_s: float) -> tuple[str, str, float]:
    """(the text, how it ended: done | error | cut, the longest gap) of one streamed completion."""
    text: list[str] = []
    last, pause = time.monotonic(), 0.0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            return "", "error", 0.0
        lines = reply.aiter_lines()
        while True:
            try:
                line = await asyncio.wait_for(lines.__anext__(), hang_s)
            except StopAsyncIteration:
                return "".join(text), "cut", pause
            now = time.monotonic()
            pause, last = max(pause, now - last), now
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "".join(text), "done", pause
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return "".join(text), "error", pause
            text.append(chunk["choices"][0]["text"])


async def soak(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="potluck-soak-"))
    model = args.model
    if model is None:
        from node_agent.model.synth import init_model

        model = init_model("qwen3_moe", work / "soak", "tiny", seed=0)
    cluster = Soak(work, Path(model), args.agents, args.latency)
    name = Path(model).resolve().name  # the served model's id
    rng = random.Random(args.seed)
    cases = [(rng.sample(range(5, 900), 24), None if i % 2 == 0 else 1000 + i) for i in range(args.prompts)]
    outcomes: list[Outcome] = []
    faults: list[Fault] = []
    try:
        cluster.start()
        await cluster.wait_all_up()
        async with httpx.AsyncClient(timeout=httpx.Timeout(args.hang, connect=10)) as http:
            want = []
            for prompt, seed in cases:
                text, ended, _ = await run_stream(http, cluster.url, request_body(name, prompt, seed, args.max_tokens),
                                                  args.hang)
                if ended != "done":
                    raise RuntimeError(f"the undisturbed run of a prompt ended {ended} (logs in {work})")
                want.append(text)
            memory_start = cluster.rss_mib()
            t0 = time.monotonic()
            stop_at = t0 + args.minutes * 60

            async def client(i: int) -> None:
                while time.monotonic() < stop_at:
                    k = rng.randrange(len(cases))
                    start = time.monotonic()
                    try:
                        text, ended, pause = await run_stream(http, cluster.url,
                                                              request_body(name, cases[k][0], cases[k][1], args.max_tokens),
                                                              args.hang)
                    except (asyncio.TimeoutError, httpx.TimeoutException):
                        outcomes.append(Outcome("hung", args.hang, start, time.monotonic()))
                        continue
                    except httpx.HTTPError as exc:
                        outcomes.append(Outcome("clean-error", 0.0, start, time.monotonic(), str(exc)))
                        continue
                    kind = {"done": "identical" if text == want[k] else "lost", "error": "clean-error",
                            "cut": "lost"}[ended]
                    outcomes.append(Outcome(kind, pause, start, time.monotonic(), "" if kind != "lost" else ended))

            async def inject() -> None:
                turn = 0
                while time.monotonic() + args.fault_every < stop_at:
                    await asyncio.sleep(args.fault_every)
                    name = rng.choice(sorted(cluster.procs))
                    kind = "SIGKILL" if turn % 2 == 0 else "SIGSTOP"
                    turn += 1
                    faults.append(Fault(kind, name, time.monotonic()))
                    print(f"soak: {kind} {name} at {time.monotonic() - t0:.0f} s", flush=True)
                    os.kill(cluster.procs[name].pid, getattr(signal, kind))
                    await asyncio.sleep(args.down)
                    if kind == "SIGKILL":
                        cluster.procs[name].wait()
                        cluster.start_agent(name)
                    else:
                        os.kill(cluster.procs[name].pid, signal.SIGCONT)

            await asyncio.gather(inject(), *(client(i) for i in range(args.clients)))
            await cluster.wait_all_up()
            await asyncio.sleep(5)  # a poll after the last rejoin: the agents have dropped what they held
            memory_end = cluster.rss_mib()
    finally:
        cluster.stop()
    return report(args, outcomes, faults, memory_start, memory_end)


def report(args: argparse.Namespace, outcomes: list[Outcome], faults: list[Fault], memory_start: dict[str, float],
           memory_end: dict[str, float]) -> dict[str, object]:
    counts = {k: sum(o.kind == k for o in outcomes) for k in ("identical", "clean-error", "lost", "hung")}
    # A stream lives through a fault when it runs while the agent is dead or stopped: it may have
    # begun after the fault, on an agent not yet found down.
    def hit(o: Outcome) -> list[Fault]:
        return [f for f in faults if o.start < f.at + args.down and f.at < o.end]

    pauses: dict[str, list[float]] = {"SIGKILL": [], "SIGSTOP": []}
    for o in outcomes:
        if (through := hit(o)) and o.kind == "identical":
            pauses[through[0].kind].append(o.pause_s)
    undisturbed = [o.pause_s for o in outcomes if o.kind == "identical" and not hit(o)]
    return {
        "command": " ".join(["python -m server.soak", *sys.argv[1:]]),
        "minutes": args.minutes, "agents": args.agents, "clients": args.clients, "link_latency": args.latency,
        "max_tokens": args.max_tokens, "faults": [f"{f.kind} {f.agent}" for f in faults],
        "requests": len(outcomes), **counts,
        "pause_s": {k: {"streams": len(v), "median": statistics.median(v) if v else None, "max": max(v) if v else None}
                    for k, v in pauses.items()},
        "undisturbed_pause_max_s": max(undisturbed) if undisturbed else None,
        "memory_mib": {"start": memory_start, "end": memory_end},
    }


def markdown(r: dict[str, object]) -> str:
    p = r["pause_s"]
    assert isinstance(p, dict)
    mem = r["memory_mib"]
    assert isinstance(mem, dict)

    def fmt(x: object) -> str:
        return "-" if x is None else f"{x:.2f}"

    rows = [
        f"Soak: {r['minutes']} min, {r['agents']} agents, {r['clients']} streaming clients, link latency "
        f"{r['link_latency']}, {r['max_tokens']} tokens a request; faults: {', '.join(r['faults']) or 'none'}",  # type: ignore[arg-type]
        "", f"`{r['command']}`", "",
        "| requests | identical | clean error | lost | hung |", "|---|---|---|---|---|",
        f"| {r['requests']} | {r['identical']} | {r['clean-error']} | {r['lost']} | {r['hung']} |", "",
        "| fault | streams through it | median pause (s) | longest pause (s) |", "|---|---|---|---|",
        *(f"| {k} | {v['streams']} | {fmt(v['median'])} | {fmt(v['max'])} |" for k, v in p.items()),
        f"| none | | | {fmt(r['undisturbed_pause_max_s'])} |", "",
        "| process | RSS start (MiB) | RSS end (MiB) |", "|---|---|---|",
        *(f"| {n} | {mem['start'].get(n, 0):.0f} | {mem['end'].get(n, 0):.0f} |" for n in mem["start"]),
    ]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=15.0, help="how long clients send requests (default 15)")
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--clients", type=int, default=4, help="concurrent streaming clients")
    p.add_argument("--fault-every", type=float, default=60.0, metavar="S", help="seconds between faults")
    p.add_argument("--down", type=float, default=15.0, metavar="S", help="seconds an agent stays killed or stopped")
    p.add_argument("--hang", type=float, default=120.0, metavar="S", help="silence after which a stream counts as hung")
    p.add_argument("--prompts", type=int, default=6, help="distinct prompts (even: greedy, odd: seeded)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--latency", default="5ms", help="each agent's emulated link latency (paces decode)")
    p.add_argument("--model", type=Path, help="checkpoint folder (default: a tiny random model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    args = p.parse_args(argv)
    r = asyncio.run(soak(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(r, indent=2))
    (args.out / "soak.md").write_text(markdown(r))
    print(markdown(r))
    return 0 if r["lost"] == 0 and r["hung"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
