"""The decode benchmark's printed table, Markdown and plot, from its JSON data (`decode.json`).

Missing figures read "n/a" (a case not run, a counter the server does not export), never nan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protos.human import format_rate
from server.bench_decode_io import io_label, io_settings
from server.bench_decode_stats import find, lan_bound_s, targets
from server.bench_report import target_lines

HEADER = ("case", "agents", "streams", "median inter-token ms", "each stream's median ms", "tokens per stream (min)",
          "tokens/s, all streams", "first token ms (last stream's)", "round trips per token")  # fmt: skip


def label(case: dict[str, Any]) -> str:
    if case["case"].startswith("io-"):
        return io_label(case)
    return {
        "transformers": "transformers, KV cache (1 process)",
        "compute": f"compute-bound, {case['agents']} agent{'s' if case['agents'] > 1 else ''}",
        "lan-compute": "compute-bound, 1 agent, a LAN agent's threads",
        "lan": "LAN",
        "streams": f"LAN, {case['streams']} stream{'s' if case['streams'] > 1 else ''}",
        "lan-disk": f"LAN with disks, {case['streams']} stream{'s' if case['streams'] > 1 else ''}",
    }[case["case"]]


def _threads(n: int) -> str:
    return f"{n} torch thread{'s' if n > 1 else ''}"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f}"


def rows(data: dict[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for c in data["cases"]:
        each = ", ".join(_ms(s) for s in c["stream_itl_s"]) if c["streams"] > 1 else "-"
        rate = c["aggregate_tokens_per_s"]
        trips = c["round_trips_per_token"]
        out.append((label(c), str(c["agents"]), str(c["streams"]), _ms(c["median_itl_s"]), each, str(c["min_tokens"]),
                    "n/a" if rate is None else f"{rate:.1f}", _ms(c.get("first_token_s")),
                    "n/a" if trips is None else f"{trips:.1f}"))
    return out


def settings(data: dict[str, Any]) -> list[str]:
    latency, cases = data["link_latency_s"], {c["case"] for c in data["cases"]}
    rounds = f"{data['rounds']} round{'s' if data['rounds'] > 1 else ''}"
    lines = [
        f"Model {data['model']} ({data['moe_layers']} MoE layers); a {data['prompt_tokens']}-token prompt of random "
        f"token ids, then {data['gen_tokens']} tokens streamed from /v1/completions (temperature 0, ignore_eos: "
        f"an end-of-sequence token does not end a stream); {rounds} "
        f"(one request each) per case after one warm-up request; {_threads(data['threads'])} for transformers "
        f"and for each compute-bound agent; a {data['cores'] or 'n/a'}-core host"
        + (f"; transformers {data['versions']['transformers']}, torch {data['versions']['torch']}."
           if data.get("versions") else "."),
    ]
    if "compute" in cases:
        lines.append("Compute-bound: every expert resident (unlimited expert memory), no throttles; transformers "
                     "decodes in the bench's process between the 1-agent cluster's requests.")
    if cases & {"lan", "streams", "lan-disk"}:
        lines.append(
            f"LAN: {data['lan_agents']} agents of {_threads(data.get('lan_threads', data['threads']))} each, link "
            f"{data['link']}, latency {latency * 1e3:g} ms one way, expert "
            f"memory {data['lan_expert_memory'] / 1e6:.0f} MB each ({100 / data['lan_agents']:.0f}% of "
            f"{data['expert_bytes_total'] / 1e6:.0f} MB of experts), --max-running {data['max_running']}.")
    if "lan" in cases:
        lines.append(f"LAN bound: 1-agent compute per token on a LAN agent's threads + {data['moe_layers']} MoE "
                     f"layers x one round trip "
                     f"({2 * latency * 1e3:g} ms) = {_ms(lan_bound_s(data))} ms.")
    if "lan-disk" in cases:
        lines.append(f"LAN with disks: the LAN cluster with each agent's disk read at {format_rate(data['lan_disk'])} "
                     f"and --max-running {max(data['lan_disk_streams'])} (the LAN case has no disk throttle: its reads are "
                     "page-cache copies); no target.")
    lines += io_settings(data)
    lines.append("Tokens/s, all streams: tokens received / time from the first request sent to the last token, "
                 "so the prompts' prefill counts; first token: the last stream's, median over rounds.")
    lines.append("Round trips per token = (decode round trips + decode steps) / decode tokens of the agents' "
                 "counters (/metrics), scraped once settled before and after the timed requests; n/a where the "
                 "server does not count them or they did not settle.")
    if data["min_tokens"] < data["gen_tokens"]:
        # Only a server that ignores the ignore_eos field (unknown fields are ignored) gets here.
        lines.append(f"Short streams: the fewest tokens a stream received was {data['min_tokens']} of "
                     f"{data['gen_tokens']} ({data['stopped']} ended with an end-of-sequence token although the "
                     f"bench sent ignore_eos); inter-token times and tokens/s count what arrived.")
    return lines


def text_table(data: dict[str, Any]) -> str:
    """The results and targets as plain columns, for the terminal."""
    table = [HEADER, *rows(data)]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    checks = [("target", "measured", "met"), *((t.name, t.measured, _verdict(t.met)) for t in targets(data))]
    if len(checks) > 1:
        w = [max(len(r[i]) for r in checks) for i in range(3)]
        lines += ["", *("  ".join(cell.ljust(x) for cell, x in zip(r, w)).rstrip() for r in checks)]
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else "met" if met else "missed"


def write_report(data: dict[str, Any], out: Path) -> None:
    lines = [
        f"`{data['command']}`",
        "",
        *settings(data),
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
        *("| " + " | ".join(r) + " |" for r in rows(data)),
        *target_lines("target", targets(data), verdicts=("met", "missed")),
        "",
        f"![decode](decode.png) `{data['command']}`",
    ]
    (out / "decode.md").write_text("\n".join(lines) + "\n")
    _plot(data, out / "decode.png")


def _plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = data["cases"]
    single = [c for c in cases if c["case"] != "streams" and not c["case"].startswith("io-")
              and c["median_itl_s"] is not None]  # fmt: skip
    io = [c for c in cases if c["case"].startswith("io-") and c["median_itl_s"] is not None]
    multi = sorted((c for c in cases if c["case"] == "streams" and c["aggregate_tokens_per_s"]),
                   key=lambda c: c["streams"])
    panels = [p for p in (single, multi, io) if p]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.2 * max(1, len(panels)), 4.4), squeeze=False)
    ax = axes[0][0]
    if single:
        ax.bar(range(len(single)), [c["median_itl_s"] * 1e3 for c in single], color="tab:blue")
        ax.set_xticks(range(len(single)), [label(c).replace(", ", "\n", 1) for c in single], fontsize=7)
        bound = lan_bound_s(data)
        lan = next((i for i, c in enumerate(single) if c["case"] == "lan"), None)
        if bound is not None and lan is not None:
            ax.hlines(bound * 1e3, lan - 0.4, lan + 0.4, colors="tab:red", linestyles="--", label="LAN bound")
            ax.legend(fontsize=7)
        ax.set_ylabel("median inter-token time (ms)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{data['prompt_tokens']}-token prompt, {data['gen_tokens']} tokens, {data['threads']} torch "
                     f"threads, median of {data['rounds']} rounds", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    if multi:
        ax = axes[0][panels.index(multi)]
        k = [c["streams"] for c in multi]
        ax.plot(k, [c["aggregate_tokens_per_s"] for c in multi], marker="o", label="measured")
        base = find(multi, "streams", streams=1)
        if base is not None:  # ideal: every stream as fast as a lone one
            ax.plot(k, [n * base["aggregate_tokens_per_s"] for n in k], ls="--", color="gray",
                    label="ideal (k x 1 stream)")
        ax.set_xticks(k)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("tokens/s, all streams")
        ax.set_ylim(bottom=0)
        ax.set_title(f"LAN: {data['lan_agents']} agents, {data['link']}, {data['link_latency_s'] * 1e3:g} ms latency, "
                     f"--max-running {data['max_running']}", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if io:
        ax = axes[0][panels.index(io)]
        ax.bar(range(len(io)), [c["median_itl_s"] * 1e3 for c in io],
               color=["tab:gray" if c["case"] == "io-whole" else "tab:green" for c in io])
        ax.set_xticks(range(len(io)), [f"{c['agents']} agents\n{c['case'].removeprefix('io-')}" for c in io],
                      fontsize=6, rotation=30)
        ax.set_ylabel("median inter-token time (ms)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"I/O-bound: half the experts in memory, disk {format_rate(data.get('io_disk', 0))}; "
                     "whole experts on demand (gray) against split and prefetch", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"potluck decode: {Path(data['model']).name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
