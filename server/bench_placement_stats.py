"""The placement benchmark's figures (server/bench_placement.py): a phase's requests and the
agents' counters become its latencies, remote share and a decode step's make-up; rounds combine
into medians; each case is kept as it ends."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Request:
    user: str
    topic: int
    sent: float  # perf_counter
    arrivals: list[float] = field(default_factory=list)  # perf_counter of each chunk with tokens
    tokens: int = 0  # tokens received
    error: str | None = None  # why the request failed (counted in the report, not raised)

    @property
    def ttft_s(self) -> float | None:
        return self.arrivals[0] - self.sent if self.arrivals else None

    @property
    def itls_s(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


def summary(requests: list[Request], counted: dict[str, float]) -> dict[str, Any]:
    """A phase's figures from its requests and the change of `PlacementCluster.counters`: besides
    the latencies and the share of expert calls off their home, what a decode step was on average
    (its tokens, its synchronous waits on peers, the bytes the agents read from disk meanwhile),
    which says where the inter-token time went."""
    itls = [x for r in requests for x in r.itls_s]
    ttfts = [t for r in requests if (t := r.ttft_s) is not None]
    local, remote, steps = counted["local"], counted["remote"], counted["steps"]

    def per_step(x: float) -> float | None:
        return x / steps if steps else None

    return {"requests": len(requests), "failed": sum(r.error is not None for r in requests),
            "errors": sorted({r.error for r in requests if r.error is not None})[:5],
            "mean_itl_s": sum(itls) / len(itls) if itls else None,
            "mean_ttft_s": sum(ttfts) / len(ttfts) if ttfts else None,
            "remote_share": remote / (local + remote) if local + remote else None,
            "disk_read_bytes": counted["disk_read_bytes"], "tokens_per_step": per_step(counted["tokens"]),
            "round_trips_per_step": per_step(counted["round_trips"]),
            "disk_bytes_per_step": per_step(counted["disk_read_bytes"]), "agent_cpu_s": counted["cpu_s"],
            "step_s": per_step(counted["step_s"]), "peer_wait_s_per_step": per_step(counted["peer_wait_s"]),
            "read_wait_s_per_step": per_step(counted["read_wait_s"])}  # fmt: skip


MEDIAN_KEYS = ("mean_itl_s", "mean_ttft_s", "remote_share", "disk_read_bytes", "tokens_per_step",
               "round_trips_per_step", "disk_bytes_per_step", "agent_cpu_s", "step_s", "peer_wait_s_per_step",
               "read_wait_s_per_step")


def median(values: list[float]) -> float | None:
    """statistics.median, None for no values."""
    return statistics.median(values) if values else None


def combined(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Several rounds of one case (each a fresh cluster, the same arrivals) as one: the median of
    each figure, the requests and failures summed, each round's inter-token time kept."""
    out = {k: median([r[k] for r in rounds if r.get(k) is not None]) for k in MEDIAN_KEYS}
    return {**out, "requests": sum(r["requests"] for r in rounds), "failed": sum(r.get("failed", 0) for r in rounds),
            "errors": sorted({e for r in rounds for e in r.get("errors", [])})[:5],
            "round_itls_s": [r["mean_itl_s"] for r in rounds]}  # fmt: skip


def combined_placement(placement: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A policy's rounds as one case (`combined`); its C(P) the median, `loaded_s` the slowest
    round's (None if one timed out), the locality the first round's (the same arrivals each round)."""
    loaded = [r["loaded_s"] for r in rounds]
    return {"placement": placement, **combined(rounds),
            "placement_cost": median([r["placement_cost"] for r in rounds if r["placement_cost"] is not None]),
            "migrated": all(r["migrated"] for r in rounds),
            "loaded_s": None if None in loaded else max(loaded), "locality": rounds[0]["locality"],
            "rounds": [{k: v for k, v in r.items() if k != "locality"} for r in rounds]}  # fmt: skip


def combined_shift(migration: bool, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The shift's rounds as one run: each phase `combined` over the rounds."""
    names = [p["phase"] for p in rounds[0]["phases"]]
    phases = [{"phase": name, **combined([p for r in rounds for p in r["phases"] if p["phase"] == name])}
              for name in names]  # fmt: skip
    return {"migration": migration, "phases": phases, "replan_migrated": all(r["replan_migrated"] for r in rounds),
            "rounds": rounds}  # fmt: skip


def locality(stats: dict[str, Any], homes: dict[str, str], top: int) -> dict[str, Any]:
    """Per user (`homes`: user -> its home agent): mean per-layer entropy of its home's histogram; the overlap (Jaccard) of the
    users' top experts, averaged over layers."""
    out: dict[str, Any] = {"entropy_bits": {}, "top_overlap": {}}
    users = list(homes)
    layers = {u: stats["homes"].get(homes[u], {}).get("layers", []) for u in users}
    for u in users:
        if layers[u]:
            out["entropy_bits"][u] = sum(x["entropy_bits"] for x in layers[u]) / len(layers[u])
    for i, a in enumerate(users):
        for b in users[i + 1:]:
            if layers[a] and layers[b]:
                overlaps = []
                for la, lb in zip(layers[a], layers[b]):
                    ta = set(sorted(range(len(la["counts"])), key=lambda e: -la["counts"][e])[:top])
                    tb = set(sorted(range(len(lb["counts"])), key=lambda e: -lb["counts"][e])[:top])
                    overlaps.append(len(ta & tb) / len(ta | tb))
                out["top_overlap"][f"{a}-{b}"] = sum(overlaps) / len(overlaps)
    return out


def progress(case: dict[str, Any]) -> str:
    """One line of a phase's figures, printed as the run goes."""

    def f(key: str, scale: float = 1.0, digits: int = 1) -> str:
        return "n/a" if case.get(key) is None else f"{case[key] * scale:.{digits}f}"
    return (f"mean inter-token {f('mean_itl_s', 1e3)} ms, TTFT {f('mean_ttft_s', 1e3)} ms, off home "
            f"{f('remote_share', 100)}%; a step: {f('tokens_per_step')} tokens, {f('round_trips_per_step')} round "
            f"trips, {f('step_s', 1e3)} ms of which {f('peer_wait_s_per_step', 1e3)} on peers, "
            f"{f('read_wait_s_per_step', 1e3)} on reads")


def keep(out: Path, case: dict[str, Any]) -> None:
    """A case as it ends, one JSON line in cases.jsonl: a run stopped part-way keeps what it measured
    (the report is written at the end)."""
    with open(out / "cases.jsonl", "a") as f:
        f.write(json.dumps(case) + "\n")
