"""The placement benchmark's report (`potluck bench placement`, server/bench_placement.py): its
targets met or missed, a Markdown table per shape and a PNG, from the run's JSON data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PRISM_BELOW_EPLB = {"many": 0.306, "bench": 0.0}  # the targets: prism's mean inter-token time this far below eplb's
RECOVERY = 0.8  # of the pre-shift gain over eplb, after the shift and one replan


def recovery(run: dict[str, Any], eplb_s: float | None) -> float | None:
    """How much of prism's gain over eplb before the shift is back after it (one replan later):
    (eplb - after) / (eplb - before), eplb's time measured on its own cluster (it places by load,
    not by home, so the shift leaves it as it was). None without a gain to recover."""
    phases = {p["phase"]: p["mean_itl_s"] for p in run["phases"]}
    before, after = phases.get("before the shift"), phases.get("shifted, after a replan")
    if eplb_s is None or before is None or after is None or eplb_s <= before:
        return None
    return (eplb_s - after) / (eplb_s - before)


def targets(shape: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) of one shape; met None where it could not be measured."""
    by = {c["placement"]: c["mean_itl_s"] for c in shape["placements"]}
    out: list[tuple[str, str, bool | None]] = []
    prism, eplb = by.get("prism"), by.get("eplb")
    want = PRISM_BELOW_EPLB.get(shape["shape"], 0.0)
    if prism is not None and eplb is not None:
        below = 1 - prism / eplb
        out.append((f"prism at least {want:.1%} below eplb" if want else "prism below eplb", f"{below:.1%} below",
                    below >= want if want else below > 0))
    for run in shape["shift"]:
        got = recovery(run, eplb)
        measured = "n/a" if got is None else f"{got:.0%}"
        if run["migration"]:
            out.append((f"migration recovers at least {RECOVERY:.0%} of the gain", measured,
                        None if got is None else got >= RECOVERY))
        else:
            out.append((f"--no-migration recovers less than {RECOVERY:.0%}", measured,
                        None if got is None else got < RECOVERY))
    runs = [*shape["placements"], *(p for run in shape["shift"] for p in run["phases"])]
    failed, total = sum(r.get("failed", 0) for r in runs), sum(r["requests"] for r in runs)
    out.append(("no failed requests", f"{failed} of {total}", failed == 0))
    return out


def mb(n: float | None, digits: int = 0) -> str:
    return "n/a" if n is None else f"{n / 1e6:.{digits}f} MB"


def num(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def ms(s: float | None) -> str:
    return "n/a" if s is None else f"{s * 1e3:.1f}"


def each_round(case: dict[str, Any]) -> str:
    """Every round's mean inter-token time (ms), in the order they ran."""
    return ", ".join(ms(x) for x in case.get("round_itls_s", [case["mean_itl_s"]]))


def markdown(data: dict[str, Any]) -> str:
    lines = [f"# `{data['command']}`", ""]
    for shape in data["shapes"]:
        s = shape["settings"]
        lines += [f"## {shape['shape']}: {s['experts']} experts top-{s['top_k']}, {s['moe_layers']} MoE layers", "",
                  f"3 agents, expert memory {', '.join(f'{m / 1e6:.0f} MB' for m in s['memory'])} "
                  f"({s['pooled_fraction']:.0%} of {s['expert_bytes_total'] / 1e6:.0f} MB of experts), disk "
                  f"{s['disk']}, link {s['link']}, latency {s['latency']}; each user {data['rate']} requests/s (Poisson), "
                  f"{data['prompt_tokens']}-token prompts from its own third of the vocabulary, {data['gen_tokens']} "
                  f"tokens each; phases of {data['phase_seconds']} s; {data.get('rounds', 1)} round(s), each case "
                  "on a fresh cluster per round, figures the median over the rounds.", "",
                  "| placement | mean inter-token ms | each round | mean TTFT ms | expert calls off their home | "
                  "read from disk | C(P) | resident after |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in shape["placements"]:
            share = "n/a" if c["remote_share"] is None else f"{c['remote_share']:.1%}"
            loaded = c.get("loaded_s")
            lines.append(f"| {c['placement']} | {ms(c['mean_itl_s'])} | {each_round(c)} | {ms(c['mean_ttft_s'])} | "
                         f"{share} | {mb(c.get('disk_read_bytes'))} | {c['placement_cost']} | "
                         f"{'timed out' if loaded is None else f'{loaded:.1f} s'} |")
        lines += ["", "A decode step on average (the agents' counters over the measured phase): its tokens, its "
                  "synchronous waits on peers, what the agents read from disk meanwhile, its wall time and of that "
                  "the waits on peers only and on the home's own reads (the rest computes or waits for the CPU); "
                  "and the agents' CPU.", "",
                  "| placement | tokens a step | round trips a step | read from disk a step | ms a step | "
                  "waiting on peers | waiting on reads | agents' CPU |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in shape["placements"]:
            lines.append(f"| {c['placement']} | {num(c.get('tokens_per_step'))} | "
                         f"{num(c.get('round_trips_per_step'))} | {mb(c.get('disk_bytes_per_step'), 2)} | "
                         f"{ms(c.get('step_s'))} | {ms(c.get('peer_wait_s_per_step'))} | "
                         f"{ms(c.get('read_wait_s_per_step'))} | {num(c.get('agent_cpu_s'), 0)} s |")
        if shape["placements"]:
            loc = shape["placements"][0]["locality"]
            lines += ["", "Per-layer entropy of each user's home (bits): " + ", ".join(
                f"{u} {v:.2f}" for u, v in loc["entropy_bits"].items()) + f" (uniform: {s['uniform_entropy']:.2f}). "
                "Overlap of the users' top experts: " + ", ".join(
                f"{k} {v:.2f}" for k, v in loc["top_overlap"].items()) + "."]  # fmt: skip
        for run in shape["shift"]:
            lines += ["", f"Shift, prism, migration {'on' if run['migration'] else 'off'} (the replan after the "
                      f"shift {'moved experts' if run.get('replan_migrated') else 'moved nothing'}):", "",
                      "| phase | mean inter-token ms | each round | expert calls off their home | read from disk |",
                      "|---|---|---|---|---|"]
            for p in run["phases"]:
                share = "n/a" if p["remote_share"] is None else f"{p['remote_share']:.1%}"
                lines.append(f"| {p['phase']} | {ms(p['mean_itl_s'])} | {each_round(p)} | {share} | "
                             f"{mb(p.get('disk_read_bytes'))} |")
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'n/a' if ok is None else 'met' if ok else 'missed'} |" for t, m, ok in targets(shape)]
        lines.append("")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    """Per shape: each placement's mean inter-token time (bars from 0), and prism through the
    shift, phase by phase, with and without migration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = data["shapes"]
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 3.8 * len(shapes)), squeeze=False)
    for row, shape in zip(axes, shapes):
        s, cases = shape["settings"], [c for c in shape["placements"] if c["mean_itl_s"] is not None]
        ax = row[0]
        ax.bar(range(len(cases)), [c["mean_itl_s"] * 1e3 for c in cases], color="tab:blue")
        for i, c in enumerate(cases):  # each round's figure over the median's bar
            rounds = [x * 1e3 for x in c.get("round_itls_s", []) if x is not None]
            ax.plot([i] * len(rounds), rounds, "k.", markersize=4)
        ax.set_xticks(range(len(cases)), [c["placement"] for c in cases], fontsize=8)
        ax.set_ylim(bottom=0)
        ax.set_ylabel(f"mean inter-token time (ms), median of {data.get('rounds', 1)} (dots: rounds)")
        ax.set_title(f"{shape['shape']}: {s['experts']} experts top-{s['top_k']}, 3 agents (memory 1:1:2, "
                     f"{s['pooled_fraction']:.0%} of the experts), {s['link']}, {s['latency']}, disk {s['disk']}", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax = row[1]
        for run in shape["shift"]:
            phases = [p for p in run["phases"] if p["mean_itl_s"] is not None]
            ax.plot(range(len(phases)), [p["mean_itl_s"] * 1e3 for p in phases], marker="o",
                    label=f"prism, migration {'on' if run['migration'] else 'off'}")
            ax.set_xticks(range(len(phases)), [p["phase"].replace(", ", "\n") for p in phases], fontsize=7)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("mean inter-token time (ms)")
        ax.set_title(f"the users swap workloads; phases of {data['phase_seconds']:g} s, a replan between the last "
                     f"two", fontsize=8)
        if shape["shift"]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"potluck placement: {data['rate']} requests/s per user, {data['prompt_tokens']}-token prompts, "
                 f"{data['gen_tokens']} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
