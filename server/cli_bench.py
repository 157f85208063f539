"""`potluck bench`: its flags (shared by the suites; each flag's help names the suites it applies
to), the help that describes a suite, and the dispatch to the suite's module."""

from __future__ import annotations

import argparse
import ast
import copy
from pathlib import Path
from typing import Any, Final

from server.cli_args import HelpFormatter, RawDescriptionFormatter, duration, positive, rate, share

# `potluck bench SUITE` -> the module that runs it, whose docstring says what the suite measures.
BENCH_SUITES: Final = {"compare": "bench", "prefill": "bench_prefill", "decode": "bench_decode",
                       "placement": "bench_placement"}


def suite_description(suite: str) -> str:
    """What a bench suite measures: its module's docstring, read from the source rather than
    imported (the suites import torch, and `--help` stays quick)."""
    source = Path(__file__).with_name(f"{BENCH_SUITES[suite]}.py").read_text(encoding="utf-8")
    return ast.get_docstring(ast.parse(source)) or ""


class _SuiteHelp(argparse.Action):
    """-h/--help of `potluck bench`: after a suite (`potluck bench decode --help`), that suite's
    description above the shared flags; without one, the overview of the suites."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        # The suite positional comes before the flag, so argparse has already set it.
        suite = getattr(namespace, "suite", None)
        if suite in BENCH_SUITES:
            parser = copy.copy(parser)
            parser.description = (f"{suite_description(suite)}\n\nEach flag's help starts with the suites it "
                                  f"applies to; {suite} ignores the other suites' flags.")
            parser.formatter_class = RawDescriptionFormatter
        parser.print_help()
        parser.exit()


def add_bench(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    overview = ("Benchmarks on local agents (figures to report, not tests). Each flag's help starts with the suites "
                "it applies to; `potluck bench SUITE --help` describes what a suite measures and how.")
    p = commands.add_parser("bench", help=overview, description=overview, formatter_class=HelpFormatter,
                            add_help=False)  # fmt: skip
    p.add_argument("-h", "--help", action=_SuiteHelp, nargs=0, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                   help="show this help and exit; after a suite, also what that suite measures")  # fmt: skip
    # default None, not "compare": the help tells `potluck bench --help` from `potluck bench compare --help`.
    p.add_argument("suite", nargs="?", choices=tuple(BENCH_SUITES),
                   help="compare (default): 1-agent prefill against transformers' forward pass; prefill: TTFT of "
                        "clusters of 1..N agents per policy and ablation, with JSON, Markdown and a plot; decode: "
                        "median inter-token time of streamed requests on compute-bound clusters of 1..N agents "
                        "(against transformers' own KV-cache decode), on an emulated LAN (against its bound, with "
                        "round trips per token) and with concurrent streams (aggregate tokens/s), with JSON, "
                        "Markdown, a plot and targets met or missed; placement: three users on three unlike agents, "
                        "each placement policy's inter-token time and remote expert calls, and a workload shift "
                        "with and without migration")  # fmt: skip
    p.add_argument("--model", type=Path, metavar="DIR", help="checkpoint folder; default: the bench preset model")
    p.add_argument("--out", type=Path, default=Path("bench-out"), metavar="DIR", help="folder for results and plots")
    p.add_argument("--tokens", type=positive, default=2048, metavar="N", help="compare: prompt tokens (default 2048)")
    p.add_argument("--repeats", type=positive, default=3, metavar="N", help="compare: timed prefills (default 3)")
    p.add_argument("--threads", type=positive, metavar="N",
                   help="compare: torch threads, default: every core; decode: torch threads of transformers and of "
                        "each agent, default 2")  # fmt: skip
    p.add_argument("--lengths", default="512,2048,4096", metavar="N,N", help="prefill: prompt lengths in tokens")
    p.add_argument("--agents", default="1,2,4", metavar="N,N", help="prefill: agent counts")
    p.add_argument("--policies", default="all", metavar="P,P",
                   help="prefill: sirius, naive, expert-parallel, sirius--no-interleave, sirius--no-token-scheduling, "
                        "sirius--no-prefetch, sirius--no-fill, or all (default)")  # fmt: skip
    p.add_argument("--memory-fraction", type=float, default=0.25, metavar="F",
                   help="prefill: expert memory per agent as a fraction of all expert bytes (default 0.25)")  # fmt: skip
    p.add_argument("--io-ratio", type=float, default=6.0, metavar="X",
                   help="prefill: disk rate such that reading every expert once takes X times a 2048-token prefill "
                        "by one agent with every expert resident (default 6; I/O-bound means at least 5)")  # fmt: skip
    p.add_argument("--compute-share", type=share, default=0.25, metavar="F",
                   help="prefill: each agent computes at this fraction of one host core (default 0.25: four agents "
                        "and their messaging fit on two cores, so none runs slower than its share); 0: unpaced, "
                        "agents share the host's cores")  # fmt: skip
    p.add_argument("--calibrate", default="each", choices=("each", "once"),
                   help="prefill: measure one agent's all-resident compute (which the lower bounds divide) right "
                        "before every case (each, default: the host's speed drifts) or only at the "
                        "start (once: faster)")  # fmt: skip
    p.add_argument("--disk-rate", type=rate, default=0.0, metavar="RATE",
                   help="prefill: fixed disk rate per agent instead of --io-ratio, e.g. 50MB/s")  # fmt: skip
    p.add_argument("--rounds", type=positive, metavar="N",
                   help="prefill: run every case (the one-agent baseline too) N times, each a fresh cluster with its own "
                        "calibration (with --calibrate each), and report the medians and every round (default 1); "
                        "decode: timed requests per case, one prompt each, after one warm-up request (default 3); placement: "
                        "fresh clusters per policy and per shift run, interleaved, reported as medians (default 3)")  # fmt: skip
    p.add_argument("--cases", default="all", metavar="C,C",
                   help="decode: compute (1..N agents, every expert resident, and transformers), lan (4 agents, "
                        "1Gbit/s, --lan-latency, 25%% of the experts each), streams (concurrent streams on the LAN "
                        "cluster), lan-disk (the LAN cluster with disks read at --lan-disk, 1 and 4 streams), io "
                        "(--io-agents holding half the experts, disk --io-disk: whole experts against split ones), or "
                        "all (default)")  # fmt: skip
    p.add_argument("--decode-agents", default="1,2,4", metavar="N,N", help="decode: agent counts of the compute case")
    p.add_argument("--streams", default="1,2,4,8", metavar="N,N", help="decode: concurrent streams of the streams case")
    p.add_argument("--io-agents", default="2,4", metavar="N,N", help="decode: agent counts of the io case")
    p.add_argument("--io-disk", default="200MB/s", metavar="RATE", type=rate,
                   help="decode: disk rate of each agent of the io case (default 200MB/s)")
    p.add_argument("--lan-disk", default="50MB/s", metavar="RATE", type=rate,
                   help="decode: disk rate of each agent of the lan-disk case (default 50MB/s)")
    p.add_argument("--prompt-tokens", type=positive, default=128, metavar="N",
                   help="decode, placement: prompt tokens per request")
    p.add_argument("--gen-tokens", type=positive, default=64, metavar="N",
                   help="decode, placement: tokens generated per request (max_tokens, with ignore_eos: every request "
                        "decodes them all; default 64)")  # fmt: skip
    p.add_argument("--shapes", default="all", metavar="S,S",
                   help="placement: bench (16 experts top-2), many (64 experts top-6), or all (default)")
    p.add_argument("--placements", default="all", metavar="P,P",
                   help="placement: prism, eplb, slimcaching, uniform, replicate-popular, or all (default)")
    p.add_argument("--phase-seconds", type=float, default=60.0, metavar="S",
                   help="placement: length of each phase (warm-up, measured, each period of the shift; default 60)")
    p.add_argument("--rate", type=float, default=0.5, metavar="R",
                   help="placement: requests a second per user, Poisson (default 0.5)")
    p.add_argument("--pooled-fraction", type=float, default=0.6, metavar="F",
                   help="placement: the three agents' expert memory together, as a fraction of the model's experts "
                        "(default 0.6: placement decides what is left out)")  # fmt: skip
    p.add_argument("--placement-disk", default="50MB/s", metavar="RATE", help="placement: each agent's disk rate")
    p.add_argument("--no-shift", action="store_true", help="placement: skip the workload shift")
    p.add_argument("--lan-latency", type=duration, default="1ms", metavar="DURATION",
                   help="decode: one-way link latency of the LAN agents, e.g. 1ms; 0 = none (default 1ms)")  # fmt: skip
    p.add_argument("--lan-threads", type=int, default=0, metavar="N",
                   help="decode: torch threads of each LAN agent; default: its fair share of the host's cores, "
                        "as potluck up gives (the LAN bound's 1-agent compute runs on as many)")  # fmt: skip
    p.set_defaults(run=run_bench, log_level="WARNING")  # its own progress lines, not every HTTP request


def run_bench(args: argparse.Namespace) -> int:
    args.suite = args.suite or "compare"
    if args.rounds is None:  # the flag is shared; each suite has its own default
        args.rounds = 3 if args.suite in ("decode", "placement") else 1
    if args.suite == "decode":
        import server.bench_decode

        return server.bench_decode.main(args)
    if args.suite == "placement":
        import server.bench_placement

        return server.bench_placement.main(args)
    if args.suite == "prefill":
        import server.bench_prefill

        return server.bench_prefill.main(args)
    import server.bench

    return server.bench.main(args)
