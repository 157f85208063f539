"""The prefill benchmark's Markdown table, target check and plot (from its JSON data), and the target
table that the decode benchmark's report (`server.bench_decode_report`) shares."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _case(cases: list[dict[str, Any]], policy: str, agents: int, tokens: int) -> dict[str, Any] | None:
    if agents == 1:
        policy = "sirius"  # one agent: the single-device expert-swapping baseline, whatever the policy
    return next((c for c in cases if c["policy"] == policy and c["agents"] == agents and c["tokens"] == tokens), None)


def targets(data: dict[str, Any], tokens: int = 2048, agents: int = 4) -> list[tuple[str, str, bool | None]]:
    """(target, what was measured, met) for the 2048-token, 4-agent figures; met None: not measured."""
    cases = data["cases"]
    one, s = _case(cases, "sirius", 1, tokens), _case(cases, "sirius", agents, tokens)
    naive = _case(cases, "naive", agents, tokens)
    if not (one and s):
        return []
    recall = s.get("prefetch_recall")
    recall = float(recall) if isinstance(recall, int | float) and not math.isnan(recall) else None
    rows: list[tuple[str, str, bool | None]] = [
        ("cold TTFT >= 3.2x faster than 1 agent", f"{one['cold_ttft_s'] / s['cold_ttft_s']:.2f}x",
         one["cold_ttft_s"] / s["cold_ttft_s"] >= 3.2),
        ("warm TTFT >= 4.0x faster than 1 agent", f"{one['warm_ttft_s'] / s['warm_ttft_s']:.2f}x",
         one["warm_ttft_s"] / s["warm_ttft_s"] >= 4.0),
        ("efficiency >= 0.8 (cold / warm)", f"{s['cold_efficiency']:.2f} / {s['warm_efficiency']:.2f}",
         min(s["cold_efficiency"], s["warm_efficiency"]) >= 0.8),
        ("attention max/mean <= 1.1", f"{s['attention_max_over_mean']:.2f}", s["attention_max_over_mean"] <= 1.1),
        # Per expert (the target); per (token, expert) pair beside it, where the agents count it.
        ("prefetch recall >= 0.9", f"{_num(recall, '.3f')} (pairs {_num(s.get('prefetch_pair_recall'), '.3f')})",
         None if recall is None else recall >= 0.9),
    ]
    if naive:
        r = naive["cold_ttft_s"] / s["cold_ttft_s"], naive["warm_ttft_s"] / s["warm_ttft_s"]
        rows.append(("cold and warm >= 1.5x faster than naive", f"{r[0]:.2f}x / {r[1]:.2f}x", min(r) >= 1.5))
    for flag in ("interleave", "token-scheduling", "prefetch"):
        off = _case(cases, f"sirius--no-{flag}", agents, tokens)
        if off:
            # Compared by efficiency (the same prompts, so the same bound but for the one-agent
            # compute measured right before each case): the host's speed drifts by 10-15% over a
            # run, which a ratio of raw TTFTs of cases run minutes apart would count as an effect.
            r = s["cold_efficiency"] / off["cold_efficiency"], s["warm_efficiency"] / off["warm_efficiency"]
            raw = off["cold_ttft_s"] / s["cold_ttft_s"], off["warm_ttft_s"] / s["warm_ttft_s"]
            rows.append((f"--no-{flag} is >= 5% slower (cold or warm), by efficiency",
                         f"{r[0]:.2f}x / {r[1]:.2f}x (TTFT {raw[0]:.2f}x / {raw[1]:.2f}x)", max(r) >= 1.05))
    return rows


def target_lines(title: str, checks: Sequence[tuple[str, str, bool | None]],
                 verdicts: tuple[str, str] = ("yes", "no")) -> list[str]:
    """A Markdown table of targets (after a blank line): what was measured, and whether it was met
    (`verdicts`), or n/a (not measurable in this run); no lines without targets."""
    if not checks:
        return []
    met = {True: verdicts[0], False: verdicts[1], None: "n/a"}
    return ["", f"| {title} | measured | met |", "|---|---|---|", *(f"| {t} | {m} | {met[ok]} |" for t, m, ok in checks)]


def _num(value: Any, spec: str, scale: float = 1.0) -> str:
    """`value` * `scale` as `spec` formats it, or n/a where it is missing (None, or the NaN that
    older runs wrote for a recall with nothing predicted)."""
    if not isinstance(value, int | float) or math.isnan(value):
        return "n/a"
    return format(value * scale, spec)


def _compute_at(data: dict[str, Any], tokens: int) -> float | None:
    """One agent's all-resident compute of a `tokens`-token prefill (keys are strings once read
    back from JSON), or None if the run did not measure that length."""
    compute = data.get("compute_s") or {}
    value = compute.get(tokens, compute.get(str(tokens)))
    return float(value) if isinstance(value, int | float) else None


def reference_tokens(data: dict[str, Any]) -> int | None:
    """The prompt length the disk rate was calibrated against: 2048 tokens unless the run left
    that length out (then its first length)."""
    if "io_reference_tokens" in data:
        return int(data["io_reference_tokens"])
    lengths = [int(n) for n in data.get("compute_s") or {}]
    return 2048 if 2048 in lengths else (lengths[0] if lengths else None)


def _share(data: dict[str, Any]) -> str:
    share = data.get("compute_share") or 0
    return f"{share:g} of one host core (paced)" if share else "not paced (the agents share the host's cores)"


def _overrun(cases: list[dict[str, Any]]) -> str:
    """Whether the emulation held: compute that ran past an agent's share, worst case."""
    worst = max(cases, key=lambda c: c.get("compute_overrun", 0.0), default=None)
    if worst is None or "compute_overrun" not in worst:
        return "The agents did not report compute overrun."
    return (f"Emulation check: in the worst request, an agent's compute ran past its share for "
            f"{_num(worst['compute_overrun'], '.1f', 100)}% of the TTFT ({worst['policy']}, {worst['agents']} agents, "
            f"{worst['tokens']} tokens).")


def settings(data: dict[str, Any]) -> str:
    """The emulated device of every agent, in one line (the report's header and the plot's title)."""
    total, memory = data.get("expert_bytes_total"), data.get("expert_memory_per_agent")
    fraction = memory / total if isinstance(memory, int | float) and total else None
    return (f"Experts {_num(total, '.0f', 1e-6)} MB; per agent: expert memory {_num(memory, '.0f', 1e-6)} MB "
            f"({_num(fraction, '.0%')}), disk {_num(data.get('disk_bytes_per_s'), '.1f', 1e-6)} MB/s, link "
            f"{data.get('link', 'n/a')}, compute {_share(data)}; a {data.get('cores', 'n/a')}-core host")


def _calibration(data: dict[str, Any]) -> str:
    if data.get("calibrate") == "once":
        return "measured once, at the start of the run"
    if data.get("calibrate") == "each":
        return "measured right before each case (column 1-agent compute)"
    return "measured right before each case (column 1-agent compute) unless the run calibrated once"


def write_report(data: dict[str, Any], out: Path) -> None:
    cases = data["cases"]
    ref = reference_tokens(data)
    lines = [
        *([f"`{data['command']}`", ""] if data.get("command") else []),
        f"{settings(data)}.",
        f"One agent reads every expert once in {_num(data.get('read_all_experts_s'), '.1f')} s and computes a "
        f"{ref if ref is not None else 'n/a'}-token prefill with every expert resident in "
        f"{_num(_compute_at(data, ref) if ref is not None else None, '.2f')} s "
        f"(ratio {_num(data.get('io_ratio'), '.1f')}x).",
        _overrun(cases),
        "",
        f"Efficiency = lower bound / TTFT; the bound's compute is one agent's all-resident compute, "
        f"{_calibration(data)}. Prefetch recall: of the experts each layer used, the share the previous layer's "
        f"prediction named; per pair: of the (token, expert) pairs routed, the share whose expert it named "
        f"(n/a where nothing was predicted or the agents do not count it). Unpaced CPU: of the agents' CPU "
        f"during a request, the share no compute pacing slowed (event loops, gRPC, gathers and combines run at "
        f"the host's speed, not the emulated device's), in the case's worst request. Split: expert runs (per layer "
        f"and expert, each owner's counted) the token scheduling split into slices over the agents, cold / warm.",
        "",
        "| policy | agents | tokens | 1-agent compute s | cold TTFT s | warm TTFT s | cold eff. | warm eff. | "
        "read cold MB | attention max/mean | prefetch recall | prefetch pair recall | unpaced CPU | split |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        c1 = c.get("compute_s", _compute_at(data, c["tokens"]))
        lines.append(
            f"| {c['policy']} | {c['agents']} | {c['tokens']} | {_num(c1, '.2f')} | {_num(c['cold_ttft_s'], '.2f')} | "
            f"{_num(c['warm_ttft_s'], '.2f')} | {_num(c['cold_efficiency'], '.2f')} | "
            f"{_num(c['warm_efficiency'], '.2f')} | {_num(c['cold_read_mb'], '.0f')} | "
            f"{_num(c['attention_max_over_mean'], '.2f')} | {_num(c.get('prefetch_recall'), '.3f')} | "
            f"{_num(c.get('prefetch_pair_recall'), '.3f')} | {_num(c.get('unpaced_cpu_share'), '.0%')} | "
            f"{_num(c.get('cold_split_experts'), '.0f')} / {_num(c.get('warm_split_experts'), '.0f')} |"
        )
    repeated = [c for c in cases if c.get("rounds")]
    if repeated:
        lines += ["", "Cases run in several rounds (a fresh cluster each, against the one-agent compute measured "
                      "right before it); the table gives their medians. Per round, cold / warm efficiency:", ""]
        lines += [f"- {c['policy']}, {c['agents']} agents, {c['tokens']} tokens: "
                  + ", ".join(f"{_num(r['cold_efficiency'], '.2f')} / {_num(r['warm_efficiency'], '.2f')}"
                              for r in c["rounds"])
                  for c in repeated]
    lines += target_lines("target (2048 tokens, 4 agents)", targets(data))
    lines += ["", "![prefill](prefill.png)" + (f" `{data['command']}`" if data.get("command") else "")]
    (out / "prefill.md").write_text("\n".join(lines) + "\n")
    _plot(data, out / "prefill.png")


def ideal(one_agent_s: float, agents: Sequence[int]) -> list[float]:
    """Perfect scaling from one agent: N agents take 1/N of its time."""
    return [one_agent_s / n for n in agents]


def _plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(data)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(data: dict[str, Any]) -> Figure:
    """TTFT against agents, a row per prompt length, cold and warm: every policy, the ideal
    scaling from one agent, the y axis from 0, and the emulated device in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = data["cases"]
    lengths = sorted({c["tokens"] for c in cases})
    counts = sorted({c["agents"] for c in cases})
    fig, axes = plt.subplots(len(lengths), 2, figsize=(11, 3.6 * len(lengths) + 0.6), squeeze=False)
    policies = sorted({c["policy"] for c in cases if c["agents"] > 1})
    what = {"cold": "cold (a fresh cluster's first request)", "warm": "warm (median of 4 later requests)"}
    for row, n in enumerate(lengths):
        for col, phase in enumerate(("cold", "warm")):
            ax = axes[row][col]
            for p in policies:
                pts = sorted((a, c[f"{phase}_ttft_s"]) for a in counts if (c := _case(cases, p, a, n)) is not None)
                ax.plot([a for a, _ in pts], [t for _, t in pts], marker="o", label=p)
            one = _case(cases, "sirius", 1, n)
            if one is not None and len(counts) > 1:
                ax.plot(counts, ideal(one[f"{phase}_ttft_s"], counts), ls="--", color="gray",
                        label="ideal (1 agent / N)")
            ax.set_title(f"{n} tokens, {what[phase]}", fontsize=9)
            ax.set_xlabel("agents")
            ax.set_ylabel("TTFT (s)")
            ax.set_xticks(counts)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    if policies:
        axes[0][0].legend(fontsize=7)
    fig.suptitle(f"potluck prefill ({Path(str(data.get('model', ''))).name}). {settings(data)}", fontsize=8)
    fig.tight_layout()
    return fig
