"""Argument types, help formatting and the device-profile flags shared by the `potluck`
subcommands (server/cli.py, server/cli_bench.py): each type turns a flag's text into a value or
an error quoting it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from server.units import UnitError, parse_duration, parse_rate, parse_size


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" unless there is none or the help text already explains it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class RawDescriptionFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """Keeps a description's own line breaks (a module docstring's lists and paragraphs)."""


T = TypeVar("T")


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """A units parser as an argparse type: its UnitError (which quotes the value) becomes the
    flag's error."""
    def convert(text: str) -> T:
        try:
            return parse(text)
        except UnitError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


size = _argument(parse_size)  # bytes
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")  # --log-level of every command

rate = _argument(parse_rate)  # bytes/s
duration = _argument(parse_duration)  # seconds


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction of one core in [0, 1], got {text!r}")
    return value


def add_profile_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert-memory", type=size, default=0, metavar="SIZE",
                   help="expert buffer budget in bytes per agent, e.g. 512MiB, 2GiB, 1.5GB; 0 = unlimited")  # fmt: skip
    p.add_argument("--disk-bandwidth", type=rate, default=0.0, metavar="RATE",
                   help="emulated expert-store read rate, e.g. 200MB/s, 800KiB/s (bytes/s); 0 = unlimited")  # fmt: skip
    p.add_argument("--link-bandwidth", type=rate, default=0.0, metavar="RATE",
                   help="emulated link rate, e.g. 1Gbit/s or 1Gb/s (bits), 50MB/s (bytes), for sending and (separately) "
                        "receiving; 0 = unlimited")  # fmt: skip
    p.add_argument("--link-latency", type=duration, default=0.0, metavar="DURATION",
                   help="emulated one-way delay of every message an agent sends, e.g. 2ms, 500us, 0.01s (a unit "
                        "is required); 0 = none (default)")  # fmt: skip
    p.add_argument("--compute-share", type=share, default=0.0, metavar="F",
                   help="emulated compute speed, a fraction of one host core in [0, 1], for benchmarks of "
                        "several local agents; 0 = not paced (default)")  # fmt: skip
