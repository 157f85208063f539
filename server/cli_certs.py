"""`potluck certs` (enrolment: the cluster's CA and certificates) and the trust flags of `agent`,
`serve` and `up` (`--certs DIR` or `--insecure`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from server.cli_args import HelpFormatter, positive
from server.setup_checks import SetupError

if TYPE_CHECKING:
    from protos.security import Credentials

log = logging.getLogger("potluck.server")
CERTS_HELP = ("Create the cluster's CA and a certificate for the server and every inventory node (mutual TLS "
              "between server and agents). Copy OUT/nodes/NAME/ to each device and OUT/server/ to the server; keep "
              "OUT/ca.key off the devices. Run again after adding nodes: the CA and existing certificates are kept.")


def add_trust_flags(p: argparse.ArgumentParser, certs_help: str) -> None:
    trust = p.add_mutually_exclusive_group()
    trust.add_argument("--certs", type=Path, metavar="DIR", help=certs_help)
    trust.add_argument("--insecure", action="store_true",
                       help="plaintext gRPC between server and agents, no certificates: anyone who reaches an agent "
                            "can use it (a trusted network only)")  # fmt: skip


def add_certs(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = commands.add_parser("certs", formatter_class=HelpFormatter, help=CERTS_HELP, description=CERTS_HELP)
    p.add_argument("--inventory", required=True, type=Path, metavar="FILE", help="YAML node inventory (see deploy/)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write (or to complete)")
    p.add_argument("--days", type=positive, default=3650, metavar="N", help="validity of new certificates, in days")
    p.set_defaults(run=_run_certs)


def _run_certs(args: argparse.Namespace) -> int:
    from server.certs import enrol
    from server.inventory import load_inventory

    nodes = [n.name for n in load_inventory(args.inventory).nodes]
    try:
        written, kept = enrol(args.out, nodes, args.days)
    except (OSError, ValueError) as exc:
        raise SetupError(f"cannot write certificates to {args.out}: {exc}") from None
    for folder in written:
        print(f"wrote {args.out / folder}/")
    for folder in kept:
        print(f"kept {args.out / folder}/ (already enrolled)")
    print(f"copy {args.out}/nodes/NAME/ to each device (potluck agent --certs DIR) and {args.out}/server/ to the "
          f"server (potluck serve --certs DIR); {args.out}/ca.key stays with you")
    return 0


def server_credentials(args: argparse.Namespace) -> Credentials | None:
    """The server's identity toward the agents from --certs; None with --insecure."""
    from protos.security import SERVER_IDENTITY, Credentials, CredentialsError
    from server.certs import own_folder

    if args.insecure:
        log.warning("--insecure: plaintext gRPC to the agents, which accept calls from anyone who reaches them")
        return None
    if args.certs is None:
        raise SetupError("give --certs DIR (the server's folder from `potluck certs --inventory FILE --out DIR`: "
                         "DIR/server), or --insecure for plaintext on a trusted network")
    creds = Credentials.load(own_folder(args.certs, None))
    if creds.identity != SERVER_IDENTITY:
        raise CredentialsError(f"{args.certs} holds the certificate of {creds.identity}, not the server's: give "
                               f"the server/ folder of `potluck certs`")
    return creds