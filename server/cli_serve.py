"""The flags `potluck serve` and `potluck up` share (the HTTP server, batching, prefill policy,
placement, split experts), and the server options they make."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from scheduler.placement import POLICIES as PLACEMENTS
from server.cli_args import LOG_LEVELS, non_negative, positive, positive_seconds, size
from server.setup_checks import port

if TYPE_CHECKING:
    from server.runner import ServerOptions


def add_server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP server binds (0.0.0.0: every interface)")
    p.add_argument("--port", type=port, default=8000, help="TCP port of the HTTP server (1-65535)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $POTLUCK_API_KEY; unset = open)")  # fmt: skip
    p.add_argument("--served-model-name", metavar="NAME", help="model id clients use; default: the model folder's name")
    p.add_argument("--max-body", type=size, default="4MiB", metavar="SIZE",
                   help="largest request body; a larger one gets 413 before it is read (0 = no bound)")  # fmt: skip
    p.add_argument("--max-waiting", type=non_negative, default=64, metavar="N",
                   help="queued requests (beyond the running ones) before answering 429")  # fmt: skip
    p.add_argument("--max-running", type=positive, default=4, metavar="N",
                   help="requests prefilling or decoding at once: running requests decode together, one token "
                        "each per step, each expert's matmul batched across them")  # fmt: skip
    p.add_argument("--prefill-chunk", type=positive, default=512, metavar="TOKENS",
                   help="prompt tokens per prefill step while other requests decode, so their streams wait at "
                        "most one chunk (a prompt arriving when nothing decodes is prefilled whole)")  # fmt: skip
    p.add_argument("--home-prefill-max", type=non_negative, default=1024, metavar="TOKENS",
                   help="a prompt of at most this many tokens is prefilled on the agent it decodes on, in its decode "
                        "steps beside the running requests' tokens; a longer one sequence-parallel on every agent "
                        "(0: every prompt sequence-parallel)")  # fmt: skip
    p.add_argument("--expert-split", default="auto", choices=("auto", "never", "always"),
                   help="how a decoding agent runs an expert it does not hold: auto splits one where that ends the "
                        "step sooner (each agent reads and runs a slice of it, 1/m of its bytes; usually one no "
                        "agent holds, on slow disks) and runs a held one on its holder; never runs each expert "
                        "whole (read whole where no agent holds it); always splits every one. Default: auto")  # fmt: skip
    p.add_argument("--no-load-balance", action="store_true",
                   help="the scheduler does not choose, from the agents' disks, compute, links and what each holds, "
                        "which experts split and over whom: a split goes over every agent, and auto splits an "
                        "unheld expert where the read it saves beats two round trips")  # fmt: skip
    p.add_argument("--no-decode-prefetch", action="store_true",
                   help="agents read nothing ahead for decode: neither, before a request decodes, the experts its "
                        "prompt chose most (dataset-free decode prefetch), nor, while it decodes, the slices of the "
                        "next layer's experts its router guesses from this layer (split experts only)")  # fmt: skip
    p.add_argument("--policy", default="sirius", choices=("sirius", "naive", "expert-parallel"),
                   help="prefill policy: sirius (interleaved partition, token scheduling, prefetch); naive (contiguous "
                        "split, each agent runs its own tokens' experts); expert-parallel (agent i owns a fixed 1/N of "
                        "every layer's experts). Default: sirius")  # fmt: skip
    p.add_argument("--no-interleave", action="store_true", help="sirius ablation: contiguous prompt split")
    p.add_argument("--no-token-scheduling", action="store_true",
                   help="sirius ablation: run an expert where it is resident, else on its largest owner")  # fmt: skip
    p.add_argument("--no-prefetch", action="store_true", help="sirius ablation: no speculative expert prefetch")
    p.add_argument("--placement", default="prism", choices=tuple(PLACEMENTS),
                   help="which experts each agent pins, from the requests' activation statistics per home agent: "
                        "prism (entropy-sized slots per layer, each home's hottest experts, coverage repair), "
                        "slimcaching (storage-constrained caching), eplb (DeepSeek's load balancer), uniform (every "
                        "expert once), replicate-popular. Default: prism")  # fmt: skip
    p.add_argument("--replan-every", type=positive_seconds, default=300.0, metavar="SECONDS",
                   help="re-plan the placement from the last window of statistics this often, and migrate when "
                        "the expected saving outweighs moving the experts (default 300)")  # fmt: skip
    p.add_argument("--stats-window", type=positive_seconds, default=None, metavar="SECONDS",
                   help="how far back the activation statistics reach (GET /admin/stats, each re-plan); "
                        "default: the re-plan period")  # fmt: skip
    p.add_argument("--no-migration", action="store_true",
                   help="keep the first placement: later re-plans are reported (GET /admin/placement), not applied")
    p.add_argument("--no-fill", action="store_true",
                   help="leave free expert memory empty between requests (by default the experts no agent holds "
                        "are read into it at the disks' lowest priority)")  # fmt: skip
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="log verbosity")


def server_options(args: argparse.Namespace, model_dir: Path) -> ServerOptions:
    from scheduler.placer import PlacementSettings
    from scheduler.policy import Policy
    from server.runner import ServerOptions

    return ServerOptions(
        model_dir=Path(model_dir), host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("POTLUCK_API_KEY") or None,
        served_model_name=args.served_model_name or Path(model_dir).resolve().name,
        max_waiting=args.max_waiting, max_running=args.max_running, prefill_chunk=args.prefill_chunk,
        home_prefill_max=args.home_prefill_max, max_body_bytes=args.max_body, expert_split=args.expert_split,
        decode_prefetch=not args.no_decode_prefetch, load_balance=not args.no_load_balance,
        log_level=args.log_level,
        policy=Policy.from_flags(args.policy, args.no_interleave, args.no_token_scheduling, args.no_prefetch,
                                 args.no_fill),
        placement=PlacementSettings(args.placement, args.replan_every, not args.no_migration, args.stats_window),
    )  # fmt: skip
