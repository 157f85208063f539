"""What an admin can get wrong before anything starts, checked at the command line's edge.

    check_model_dir(Path("models/m"), needs_tokenizer=True)   # SetupError: what is missing, how to fix
    check_port_free("127.0.0.1", 50051, "--listen")           # SetupError if another process has it
    port("80000")                                              # argparse error: ports are 1-65535

Every check raises `SetupError` with one or two lines that say what is wrong and what to do;
`potluck` prints it without a traceback (with one at --log-level DEBUG). The checks run before
any heavy import or network call, so a mistake costs the admin a second, not a model load.
"""

from __future__ import annotations

import argparse
import errno
import socket
from pathlib import Path

from server.inventory import split_address

DEMO_HINT = "create a demo checkpoint with: potluck init-model --arch qwen3_moe --out DIR"


class SetupError(Exception):
    """A mistake in the command line, the inventory or the files it names; the message says how
    to fix it."""


def check_model_dir(path: Path, flag: str = "--model", needs_tokenizer: bool = False) -> None:
    """`path` is a checkpoint folder: config.json, safetensors weights and (for the server, which
    tokenizes) a tokenizer."""
    if not path.exists():
        raise SetupError(f"{flag} {path}: no such folder. Give a checkpoint folder (config.json, *.safetensors, "
                         f"tokenizer.json), or {DEMO_HINT}")
    if not path.is_dir():
        raise SetupError(f"{flag} {path}: not a folder. Give the checkpoint's folder, not one of its files")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if needs_tokenizer and not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        missing.append("a tokenizer (tokenizer.json or tokenizer.model)")
    if missing:
        what = "an empty folder" if not any(path.iterdir()) else f"lacks {', '.join(missing)}"
        raise SetupError(f"{flag} {path}: not a checkpoint folder ({what}). Copy the model's Hugging Face "
                         f"folder there, or {DEMO_HINT}")


def check_new_folder(path: Path, flag: str = "--out") -> None:
    """`path` can be written as a new checkpoint: absent, or an empty folder."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SetupError(f"{flag} {path}: already exists and is not an empty folder. Pick a new path, or delete it "
                         f"first")


def check_port_free(host: str, port: int, flag: str) -> None:
    """Nothing listens on host:port yet. Binding without SO_REUSEPORT is the test: gRPC binds with
    it, which let a second agent share a port with the first and take half its calls. With
    SO_REUSEADDR, as servers bind: the connections of a process that was just killed linger on its
    port (TIME_WAIT), and an agent restarted there must not be refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SetupError(f"{flag}: port {port} on {host} is already in use (another potluck process, or "
                                 f"another program). Stop it, or pick another port") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise SetupError(f"{flag}: {host} is not an address of this machine. Use one of its own addresses, "
                                 f"or 0.0.0.0 for every interface") from None
            raise SetupError(f"{flag}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def port(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port in 1-65535, got {text!r}")
    return int(text)


def port_or_any(text: str) -> int:
    """argparse type: a TCP port, or 0 for any free one."""
    return 0 if text == "0" else port(text)


def listen_address(text: str) -> str:
    """argparse type: HOST:PORT with a port in 1-65535 (`[::1]:50051` for IPv6)."""
    try:
        split_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
