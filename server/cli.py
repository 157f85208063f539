"""`potluck`: the command line. One subcommand per job; each flag's help gives its unit and default.

    potluck up                                   # demo model, 2 local agents, server on :8000
    potluck init-model --arch qwen3_moe --out models/tiny
    potluck agent --listen 0.0.0.0:50051 --model /srv/models/m --expert-memory 6GiB
    potluck certs --inventory deploy/home-lan.example.yaml --out certs/
    potluck serve --inventory deploy/home-lan.example.yaml --model /srv/models/m --certs certs/server
    potluck bench

This is the process's edge: it alone reads environment variables ($XDG_CACHE_HOME,
$POTLUCK_API_KEY) and turns flags into the typed settings the other modules take. Heavy modules
(torch, transformers, grpc) are imported by the subcommand that needs them, so `--help` is quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Final

from server.cli_args import LOG_LEVELS, HelpFormatter, add_profile_flags, duration, non_negative, positive, size
from server.cli_bench import add_bench
from server.cli_certs import add_certs, add_trust_flags, server_credentials
from server.cli_serve import add_server_flags, server_options
from server.setup_checks import SetupError, listen_address, port_or_any
from server.version import potluck_version

log = logging.getLogger("potluck.server")
DEMO_ARCH: Final = "qwen3_moe"  # what `potluck up` serves when given no --model
DEMO_PRESET: Final = "tiny"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="potluck",
        description="Serve a Mixture-of-Experts LLM from the devices on one LAN, behind an OpenAI-compatible API.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"potluck {potluck_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_init_model(commands)
    _add_agent(commands)
    _add_serve(commands)
    _add_up(commands)
    _add_status(commands)
    add_certs(commands)
    add_bench(commands)
    return parser


def _sub(commands: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    return commands.add_parser(  # type: ignore[no-any-return]
        name, help=help_text, description=help_text, formatter_class=HelpFormatter
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
        p.add_argument(flag, type=positive, metavar="N", help=f"{what}; default: the preset's")
    p.add_argument("--seed", type=non_negative, default=0, metavar="S", help="random seed of the weights")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of stored weights")
    p.add_argument("--topics", type=non_negative, default=0, metavar="N",
                   help="routers biased by token range, for placement benchmarks: the vocabulary splits into N "
                        "ranges and each layer's experts into N groups, and tokens of range r mostly choose group "
                        "r, and the output layer keeps a sampled answer in its prompt's range (random weights have "
                        "no topics otherwise); 0 = none")  # fmt: skip
    p.set_defaults(run=_run_init_model)


def _add_agent(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _sub(commands, "agent", "Run a node agent on this device (a gRPC server) until SIGINT/SIGTERM.")
    p.add_argument("--listen", required=True, type=listen_address, metavar="HOST:PORT",
                   help="address of the gRPC server (port 1-65535)")  # fmt: skip
    p.add_argument("--model", required=True, type=Path, metavar="DIR", help="checkpoint folder on this device")
    p.add_argument("--name", help="node name as in the inventory; default: the --listen address")
    add_profile_flags(p)
    p.add_argument("--torch-threads", type=positive, default=1, metavar="N", help="torch intra-op threads")
    p.add_argument("--data-port", type=port_or_any, default=0, metavar="PORT",
                   help="TCP port of the decode data plane (agent-to-agent expert calls), on the --listen host; "
                        "0 = any free port (default)")  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="compute dtype")
    p.add_argument("--eviction", default="layer-cyclic", choices=("layer-cyclic", "lru"),
                   help="expert eviction: layer-cyclic (evict the expert whose layer comes round last; default) or "
                        "lru (least recently used)")  # fmt: skip
    p.add_argument("--max-requests", type=positive, default=256, metavar="N",
                   help="requests this agent holds state for at once; more are refused (RESOURCE_EXHAUSTED)")
    p.add_argument("--max-step-tokens", type=positive, default=32768, metavar="N",
                   help="new tokens of one request in one prefill step; a larger step is refused")
    p.add_argument("--max-inbox", type=size, default="1GiB", metavar="SIZE",
                   help="K/V received from peers and not yet used, all requests together")
    p.add_argument("--request-ttl", type=duration, default="600s", metavar="DURATION",
                   help="a request no message has named for this long is released (its server died or forgot it)")
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="log verbosity")
    add_trust_flags(p, "this node's certificate folder from `potluck certs` (ca.pem, cert.pem, key.pem; or the "
                        "whole --out folder of `potluck certs`, which holds nodes/NAME/)")
    p.set_defaults(run=_run_agent)






def _add_serve(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _sub(commands, "serve", "Serve the OpenAI-compatible API, driving the agents listed in an inventory.")
    p.add_argument("--inventory", required=True, type=Path, metavar="FILE", help="YAML node inventory (see deploy/)")
    p.add_argument("--model", type=Path, metavar="DIR", help="checkpoint folder; default: the inventory's 'model'")
    add_server_flags(p)
    add_trust_flags(p, "the server's certificate folder from `potluck certs` (its server/ folder)")
    p.set_defaults(run=_run_serve)


def _add_up(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _sub(commands, "up", "Start local agents and the server in one command (the embedded default).")
    p.add_argument("--model", type=Path, metavar="DIR",
                   help="checkpoint folder; default: a demo qwen3_moe/tiny model, created once in the cache")  # fmt: skip
    agents = p.add_mutually_exclusive_group()
    # default None, not 2: argparse cannot tell "--agents 2" from its default when checking that
    # --agents and --inventory are not both given.
    agents.add_argument("--agents", type=positive, metavar="N", help="local agents to start (default: 2)")
    agents.add_argument("--inventory", type=Path, metavar="FILE",
                        help="start the loopback agents this inventory lists, each with its own profile")  # fmt: skip
    add_profile_flags(p)
    p.add_argument("--agent-start-timeout", type=float, default=180.0, metavar="SECONDS",
                   help="how long to wait for the agents to load and report SERVING")  # fmt: skip
    add_server_flags(p)
    add_trust_flags(p, "use this `potluck certs` output for the agents and the server (default: a throwaway CA, "
                        "made at start and removed at exit)")
    p.set_defaults(run=_run_up)


def _add_status(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _sub(commands, "status", "Show the cluster a server drives: each agent's state, expert memory, experts "
             "held, hit rate, bytes read and sent, requests; and the queue.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--api-key", default=None, metavar="KEY", help="the server's API key (default: $POTLUCK_API_KEY)")
    p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (2 if given alone) until Ctrl-C")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the JSON of GET /admin/status instead of a table")
    p.set_defaults(run=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    import json
    import time

    from server.status import fetch_status, status_table

    key = args.api_key or os.environ.get("POTLUCK_API_KEY")
    while True:
        body = fetch_status(args.url, key)
        text = json.dumps(body, indent=2) if args.json else status_table(body)
        if args.watch is None:
            print(text)
            return 0
        print("\033[H\033[J" + time.strftime("%H:%M:%S ") + text, flush=True)  # clear the screen, then the table
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def _run_init_model(args: argparse.Namespace) -> int:
    from node_agent.model.synth import init_model
    from server.setup_checks import check_new_folder

    check_new_folder(args.out)

    try:
        init_model(
            args.arch, args.out, args.preset, hidden_size=args.hidden_size, layers=args.layers, experts=args.experts,
            experts_per_token=args.experts_per_token, intermediate_size=args.intermediate_size,
            vocab_size=args.vocab_size, seed=args.seed, dtype=args.dtype, progress=_progress, topics=args.topics,
        )  # fmt: skip
    except ValueError as exc:  # a shape the flags ask for that cannot be built: the flag's value, no traceback
        raise SetupError(str(exc)) from None
    return 0


def _run_agent(args: argparse.Namespace) -> int:
    from server.inventory import split_address
    from server.setup_checks import check_model_dir, check_port_free

    check_model_dir(args.model)
    host, grpc_port = split_address(args.listen)
    check_port_free(host, grpc_port, "--listen")
    if args.data_port:
        check_port_free(host, args.data_port, "--data-port")
    from node_agent.service import AgentSettings, run_agent
    from server.certs import own_folder

    if args.certs is None and not args.insecure:
        raise SetupError("give --certs DIR (this node's folder from `potluck certs --inventory FILE --out DIR`: "
                         "DIR/nodes/NAME), or --insecure for plaintext on a trusted network")
    settings = AgentSettings(
        listen=args.listen, model_dir=args.model, name=args.name, expert_memory_bytes=args.expert_memory,
        disk_bytes_per_s=args.disk_bandwidth, link_bytes_per_s=args.link_bandwidth, link_latency_s=args.link_latency,
        compute_share=args.compute_share, torch_threads=1 if args.compute_share else args.torch_threads,
        dtype=args.dtype, eviction=args.eviction, log_level=args.log_level, data_port=args.data_port,
        certs=own_folder(args.certs, args.name or args.listen) if args.certs else None, insecure=args.insecure,
        max_requests=args.max_requests, max_step_tokens=args.max_step_tokens, max_inbox_bytes=args.max_inbox,
        request_ttl_s=args.request_ttl,
    )  # fmt: skip
    settings.credentials()  # a wrong folder is an admin's error: said now, before loading any weights
    run_agent(settings)
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from protos.messages import AgentInfo
    from scheduler.types import NodeId, NodeSpec
    from server.inventory import load_inventory, profile_mismatches, up_only_fields
    from server.runner import Reload, serve_http
    from server.setup_checks import check_port_free

    inventory = load_inventory(args.inventory)
    model_dir = _model_dir(args, inventory.model, args.inventory)
    if model_dir is None:
        raise SetupError(f"give --model DIR, or 'model:' in {args.inventory}")
    check_port_free(args.host, args.port, "--port")
    profiles = inventory.profiles()
    for line in up_only_fields(inventory):
        log.warning("%s", line)

    def on_join(name: NodeId, info: AgentInfo) -> None:
        for line in profile_mismatches(name, profiles[name], info) if name in profiles else ():
            log.warning("%s", line)

    def read() -> tuple[NodeSpec, ...]:  # on SIGHUP or a change of the file; the model stays
        again = load_inventory(args.inventory)
        profiles.clear()
        profiles.update(again.profiles())
        return again.node_specs()

    options = dataclasses.replace(server_options(args, model_dir), credentials=server_credentials(args))
    return serve_http(options, inventory.node_specs(), on_join=on_join,
                      reload=Reload(args.inventory, read))


def _model_dir(args: argparse.Namespace, from_inventory: Path | None, inventory: Path | None) -> Path | None:
    """--model, else the inventory's `model:`, checked to be a checkpoint folder the server can
    serve (None: neither is given)."""
    from server.setup_checks import check_model_dir

    if args.model is not None:
        check_model_dir(args.model, "--model", needs_tokenizer=True)
        return Path(args.model)
    if from_inventory is not None:
        check_model_dir(from_inventory, f"{inventory}: model:", needs_tokenizer=True)
    return from_inventory


def _run_up(args: argparse.Namespace) -> int:
    from server.inventory import NodeProfile, load_inventory
    from server.launcher import LocalAgents, launches_from_inventory, plan_local_agents, specs_of
    from server.runner import run_up
    from server.setup_checks import check_port_free

    check_port_free(args.host, args.port, "--port")
    inventory = load_inventory(args.inventory) if args.inventory is not None else None
    if inventory is not None:
        launches = launches_from_inventory(inventory, avoid={args.port})
    else:
        profile = NodeProfile(args.expert_memory, args.disk_bandwidth, args.link_bandwidth, args.compute_share,
                              args.link_latency)
        launches = plan_local_agents(args.agents or 2, profile, avoid={args.port})
    model_dir = _model_dir(args, inventory.model if inventory else None, args.inventory) or _demo_model()
    agents = LocalAgents(model_dir, launches, args.log_level, insecure=args.insecure, enrolment=args.certs)
    specs = inventory.node_specs() if inventory is not None else specs_of(launches)  # with their labels and users
    return run_up(server_options(args, model_dir), agents, specs, args.agent_start_timeout)


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
    from protos.security import CredentialsError
    from scheduler.errors import JoinRefused, NoAgentsAvailable
    from server.inventory import InventoryError

    try:
        return int(args.run(args))
    except (SetupError, InventoryError, NoAgentsAvailable, JoinRefused, CredentialsError) as exc:
        # An admin's mistake: what is wrong and how to fix it, without a traceback unless asked for.
        if getattr(args, "log_level", "INFO") == "DEBUG":
            logging.getLogger("potluck").exception("potluck %s failed", args.command)
        print(f"potluck {args.command}: error: {exc}", file=sys.stderr)
        if isinstance(exc, NoAgentsAvailable):
            print(f"potluck {args.command}: hint: start each agent first (potluck agent --name NAME --listen "
                  f"HOST:PORT --model DIR), and check the inventory's names and addresses", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
