"""`potluck`: the command line. One subcommand per job; each flag's help gives its unit and default.

    potluck up                                   # demo model, 2 local agents, server on :8000
    potluck init-model --arch qwen3_moe --out models/tiny
    potluck agent --listen 0.0.0.0:50051 --model /srv/models/m --expert-memory 6GiB
    potluck serve --inventory deploy/home-lan.example.yaml --model /srv/models/m
    potluck bench

This is the process's edge: it alone reads environment variables ($XDG_CACHE_HOME,
$POTLUCK_API_KEY) and turns flags into the typed settings the other modules take. Heavy modules
(torch, transformers, grpc) are imported by the subcommand that needs them, so `--help` is quick.
"""

from __future__ import annotations

import argparse
import ast
import copy
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from server.units import UnitError, parse_duration, parse_rate, parse_size

if TYPE_CHECKING:
    from server.runner import ServerOptions

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEMO_ARCH: Final = "qwen3_moe"  # what `potluck up` serves when given no --model
DEMO_PRESET: Final = "tiny"
# `potluck bench SUITE` -> the module that runs it, whose docstring says what the suite measures.
BENCH_SUITES: Final = {"compare": "bench", "prefill": "bench_prefill", "decode": "bench_decode"}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" unless there is none or the help text already explains it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _RawDescriptionFormatter(argparse.RawDescriptionHelpFormatter, _HelpFormatter):
    """Keeps a description's own line breaks (a module docstring's lists and paragraphs)."""


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
            parser.formatter_class = _RawDescriptionFormatter
        parser.print_help()
        parser.exit()


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate(text: str) -> float:
    try:
        return parse_rate(text)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction of one core in [0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="potluck",
        description="Serve a Mixture-of-Experts LLM from the devices on one LAN, behind an OpenAI-compatible API.",
        formatter_class=_HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_init_model(commands)
    _add_agent(commands)
    _add_serve(commands)
    _add_up(commands)
    _add_bench(commands)
    return parser


def _sub(commands: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    return commands.add_parser(  # type: ignore[no-any-return]
        name, help=help_text, description=help_text, formatter_class=_HelpFormatter
    )


def _add_init_model(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _sub(commands, "init-model", "Write a random-weight MoE checkpoint (Hugging Face layout) for tests and demos.")
    p.add_argument("--arch", required=True, choices=("qwen3_moe", "mixtral"), help="architecture family")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="new (or empty) folder to write")
    p.add_argument("--preset", default="tiny", choices=("tiny", "bench"), help="base shape")
    for flag, what in (
        ("--hidden-size", "model width (hidden units)"),
        ("--layers", "decoder layers"),
        ("--experts", "routed experts per MoE layer"),
        ("--experts-per-token", "experts each token is routed to (top-k)"),
        ("--intermediate-size", "width of one expert's MLP (hidden units)"),
        ("--vocab-size", "tokenizer vocabulary (tokens)"),
    ):
        p.add_argument(flag, type=_positive, metavar="N", help=f"{what}; default: the preset's")
    p.add_argument("--seed", type=_non_negative, default=0, metavar="S", help="random seed of the weights")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of stored weights")
    p.set_defaults(run=_run_init_model)


def _add_agent(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _sub(commands, "agent", "Run a node agent on this device (a gRPC server) until SIGINT/SIGTERM.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address of the gRPC server")
    p.add_argument("--model", required=True, type=Path, metavar="DIR", help="checkpoint folder on this device")
    p.add_argument("--name", help="node name as in the inventory; default: the --listen address")
    _add_profile_flags(p)
    p.add_argument("--torch-threads", type=_positive, default=1, metavar="N", help="torch intra-op threads")
    p.add_argument("--data-port", type=_non_negative, default=0, metavar="PORT",
                   help="TCP port of the decode data plane (agent-to-agent expert calls), on the --listen host; "
                        "0 = any free port (default)")  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="compute dtype")
    p.add_argument("--eviction", default="layer-cyclic", choices=("layer-cyclic", "lru"),
                   help="expert eviction: layer-cyclic (evict the expert whose layer comes round last; default) or "
                        "lru (least recently used)")  # fmt: skip
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="log verbosity")
    p.set_defaults(run=_run_agent)


def _add_profile_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert-memory", type=_size, default=0, metavar="SIZE",
                   help="expert buffer budget in bytes per agent, e.g. 512MiB, 2GiB, 1.5GB; 0 = unlimited")  # fmt: skip
    p.add_argument("--disk-bandwidth", type=_rate, default=0.0, metavar="RATE",
                   help="emulated expert-store read rate, e.g. 200MB/s, 800KiB/s (bytes/s); 0 = unlimited")  # fmt: skip
    p.add_argument("--link-bandwidth", type=_rate, default=0.0, metavar="RATE",
                   help="emulated link rate, e.g. 1Gbit/s, 50MB/s (bytes/s), for sending and (separately) "
                        "receiving; 0 = unlimited")  # fmt: skip
    p.add_argument("--link-latency", type=_duration, default=0.0, metavar="DURATION",
                   help="emulated one-way delay of every message an agent sends, e.g. 2ms, 500us, 0.01s (a unit "
                        "is required); 0 = none (default)")  # fmt: skip
    p.add_argument("--compute-share", type=_share, default=0.0, metavar="F",
                   help="emulated compute speed, a fraction of one host core in [0, 1], for benchmarks of "
                        "several local agents; 0 = not paced (default)")  # fmt: skip


def _add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP server binds (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port of the HTTP server")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $POTLUCK_API_KEY; unset = open)")  # fmt: skip
    p.add_argument("--served-model-name", metavar="NAME", help="model id clients use; default: the model folder's name")
    p.add_argument("--max-waiting", type=_non_negative, default=64, metavar="N",
                   help="queued requests (beyond the running ones) before answering 429")  # fmt: skip
    p.add_argument("--max-running", type=_positive, default=4, metavar="N",
                   help="requests prefilling or decoding at once: running requests decode together, one token "
                        "each per step, each expert's matmul batched across them")  # fmt: skip
    p.add_argument("--prefill-chunk", type=_positive, default=512, metavar="TOKENS",
                   help="prompt tokens per prefill step while other requests decode, so their streams wait at "
                        "most one chunk (a prompt arriving when nothing decodes is prefilled whole)")  # fmt: skip
    p.add_argument("--policy", default="sirius", choices=("sirius", "naive", "expert-parallel"),
                   help="prefill policy: sirius (interleaved partition, token scheduling, prefetch); naive (contiguous "
                        "split, each agent runs its own tokens' experts); expert-parallel (agent i owns a fixed 1/N of "
                        "every layer's experts). Default: sirius")  # fmt: skip
    p.add_argument("--no-interleave", action="store_true", help="sirius ablation: contiguous prompt split")
    p.add_argument("--no-token-scheduling", action="store_true",
                   help="sirius ablation: run an expert where it is resident, else on its largest owner")  # fmt: skip
    p.add_argument("--no-prefetch", action="store_true", help="sirius ablation: no speculative expert prefetch")
    p.add_argument("--no-fill", action="store_true",
                   help="leave free expert memory empty between requests (by default the experts no agent holds "
                        "are read into it at the disks' lowest priority)")  # fmt: skip
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="log verbosity")


def _add_serve(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _sub(commands, "serve", "Serve the OpenAI-compatible API, driving the agents listed in an inventory.")
    p.add_argument("--inventory", required=True, type=Path, metavar="FILE", help="YAML node inventory (see deploy/)")
    p.add_argument("--model", type=Path, metavar="DIR", help="checkpoint folder; default: the inventory's 'model'")
    _add_server_flags(p)
    p.set_defaults(run=_run_serve)


def _add_up(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _sub(commands, "up", "Start local agents and the server in one command (the embedded default).")
    p.add_argument("--model", type=Path, metavar="DIR",
                   help="checkpoint folder; default: a demo qwen3_moe/tiny model, created once in the cache")  # fmt: skip
    agents = p.add_mutually_exclusive_group()
    # default None, not 2: argparse cannot tell "--agents 2" from its default when checking that
    # --agents and --inventory are not both given.
    agents.add_argument("--agents", type=_positive, metavar="N", help="local agents to start (default: 2)")
    agents.add_argument("--inventory", type=Path, metavar="FILE",
                        help="start the loopback agents this inventory lists, each with its own profile")  # fmt: skip
    _add_profile_flags(p)
    p.add_argument("--agent-start-timeout", type=float, default=180.0, metavar="SECONDS",
                   help="how long to wait for the agents to load and report SERVING")  # fmt: skip
    _add_server_flags(p)
    p.set_defaults(run=_run_up)


def _add_bench(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    overview = ("Benchmarks on local agents (figures to report, not tests). Each flag's help starts with the suites "
                "it applies to; `potluck bench SUITE --help` describes what a suite measures and how.")
    p = commands.add_parser("bench", help=overview, description=overview, formatter_class=_HelpFormatter,
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
                        "Markdown, a plot and targets met or missed")  # fmt: skip
    p.add_argument("--model", type=Path, metavar="DIR", help="checkpoint folder; default: the bench preset model")
    p.add_argument("--out", type=Path, default=Path("bench-out"), metavar="DIR", help="folder for results and plots")
    p.add_argument("--tokens", type=_positive, default=2048, metavar="N", help="compare: prompt tokens (default 2048)")
    p.add_argument("--repeats", type=_positive, default=3, metavar="N", help="compare: timed prefills (default 3)")
    p.add_argument("--threads", type=_positive, metavar="N",
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
    p.add_argument("--compute-share", type=_share, default=0.25, metavar="F",
                   help="prefill: each agent computes at this fraction of one host core (default 0.25: four agents "
                        "and their messaging fit on two cores, so none runs slower than its share); 0: unpaced, "
                        "agents share the host's cores")  # fmt: skip
    p.add_argument("--calibrate", default="each", choices=("each", "once"),
                   help="prefill: measure one agent's all-resident compute (which the lower bounds divide) right "
                        "before every case (each, default: the host's speed drifts) or only at the "
                        "start (once: faster)")  # fmt: skip
    p.add_argument("--disk-rate", type=_rate, default=0.0, metavar="RATE",
                   help="prefill: fixed disk rate per agent instead of --io-ratio, e.g. 50MB/s")  # fmt: skip
    p.add_argument("--rounds", type=_positive, metavar="N",
                   help="prefill: run every case (the one-agent baseline too) N times, each a fresh cluster with its own "
                        "calibration (with --calibrate each), and report the medians and every round (default 1); "
                        "decode: timed requests per case, one prompt each, after one warm-up request (default 3)")  # fmt: skip
    p.add_argument("--cases", default="all", metavar="C,C",
                   help="decode: compute (1..N agents, every expert resident, and transformers), lan (4 agents, "
                        "1Gbit/s, --lan-latency, 25%% of the experts each), streams (concurrent streams on the LAN "
                        "cluster), or all (default)")  # fmt: skip
    p.add_argument("--decode-agents", default="1,2,4", metavar="N,N", help="decode: agent counts of the compute case")
    p.add_argument("--streams", default="1,2,4,8", metavar="N,N", help="decode: concurrent streams of the streams case")
    p.add_argument("--prompt-tokens", type=_positive, default=128, metavar="N", help="decode: prompt tokens per request")
    p.add_argument("--gen-tokens", type=_positive, default=64, metavar="N",
                   help="decode: tokens generated per request (max_tokens, with ignore_eos: every request "
                        "decodes them all; default 64)")  # fmt: skip
    p.add_argument("--lan-latency", type=_duration, default="1ms", metavar="DURATION",
                   help="decode: one-way link latency of the LAN agents, e.g. 1ms; 0 = none (default 1ms)")  # fmt: skip
    p.set_defaults(run=_run_bench, log_level="WARNING")  # its own progress lines, not every HTTP request


def _run_init_model(args: argparse.Namespace) -> int:
    from node_agent.model.synth import init_model

    init_model(
        args.arch, args.out, args.preset, hidden_size=args.hidden_size, layers=args.layers, experts=args.experts,
        experts_per_token=args.experts_per_token, intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size, seed=args.seed, dtype=args.dtype, progress=_progress,
    )  # fmt: skip
    return 0


def _run_agent(args: argparse.Namespace) -> int:
    from node_agent.service import AgentSettings, run_agent

    settings = AgentSettings(
        listen=args.listen, model_dir=args.model, name=args.name, expert_memory_bytes=args.expert_memory,
        disk_bytes_per_s=args.disk_bandwidth, link_bytes_per_s=args.link_bandwidth, link_latency_s=args.link_latency,
        compute_share=args.compute_share, torch_threads=1 if args.compute_share else args.torch_threads,
        dtype=args.dtype, eviction=args.eviction, log_level=args.log_level, data_port=args.data_port,
    )  # fmt: skip
    run_agent(settings)
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from server.inventory import load_inventory
    from server.runner import serve_http

    inventory = load_inventory(args.inventory)
    model_dir = args.model or inventory.model
    if model_dir is None:
        raise SystemExit("potluck serve: give --model DIR, or 'model:' in the inventory")
    return serve_http(_server_options(args, model_dir), inventory.node_specs())


def _run_up(args: argparse.Namespace) -> int:
    from server.inventory import NodeProfile, load_inventory
    from server.launcher import LocalAgents, launches_from_inventory, plan_local_agents, specs_of
    from server.runner import run_up

    if args.inventory is not None:
        launches = launches_from_inventory(load_inventory(args.inventory), avoid={args.port})
    else:
        profile = NodeProfile(args.expert_memory, args.disk_bandwidth, args.link_bandwidth, args.compute_share,
                              args.link_latency)
        launches = plan_local_agents(args.agents or 2, profile, avoid={args.port})
    model_dir = args.model or _demo_model()
    agents = LocalAgents(model_dir, launches, args.log_level)
    return run_up(_server_options(args, model_dir), agents, specs_of(launches), args.agent_start_timeout)


def _run_bench(args: argparse.Namespace) -> int:
    args.suite = args.suite or "compare"
    if args.rounds is None:  # the flag is shared; each suite has its own default
        args.rounds = 3 if args.suite == "decode" else 1
    if args.suite == "decode":
        import server.bench_decode

        return server.bench_decode.main(args)
    if args.suite == "prefill":
        import server.bench_prefill

        return server.bench_prefill.main(args)
    import server.bench

    return server.bench.main(args)


def _server_options(args: argparse.Namespace, model_dir: Path) -> ServerOptions:
    from scheduler.policy import Policy
    from server.runner import ServerOptions

    return ServerOptions(
        model_dir=Path(model_dir), host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("POTLUCK_API_KEY") or None,
        served_model_name=args.served_model_name or Path(model_dir).resolve().name,
        max_waiting=args.max_waiting, max_running=args.max_running, prefill_chunk=args.prefill_chunk,
        log_level=args.log_level,
        policy=Policy.from_flags(args.policy, args.no_interleave, args.no_token_scheduling, args.no_prefetch,
                                 args.no_fill),
    )  # fmt: skip


def _demo_model() -> Path:
    """The demo checkpoint in the user's cache, created on first use and reused afterwards."""
    from node_agent.model.synth import init_model

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "potluck"
    folder = cache / f"demo-{DEMO_ARCH}-{DEMO_PRESET}"
    if not (folder / "config.json").exists():
        _progress(f"creating the demo model in {folder} (once)")
        try:
            init_model(DEMO_ARCH, folder, DEMO_PRESET, progress=_progress)
        except FileExistsError:
            if not (folder / "config.json").exists():  # not a concurrent `up` that won the race
                raise
    return folder


def _progress(line: str) -> None:
    print(f"potluck: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from server.inventory import InventoryError

    try:
        return int(args.run(args))
    except InventoryError as exc:
        print(f"potluck {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
