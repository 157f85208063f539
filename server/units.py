"""Human-friendly sizes, rates and durations for device profiles: `512MiB`, `50MB/s`, `2ms`.

    parse_size("1.5GiB") == 1610612736        # bytes (int); "unlimited" / "0" -> 0
    parse_rate("100Mbit/s") == 12_500_000.0   # bytes per second (float); "unlimited" -> 0.0
    parse_duration("500us") == 0.0005         # seconds (float); "0" / "none" -> 0.0

0 means unlimited everywhere in potluck (the agents' `DeviceProfile` uses the same convention).
Prefixes are case-insensitive: `KiB/MiB/GiB/TiB` (and `Ki`, `Mi`, ...) are powers of 1024,
`kB/MB/GB/TB` (and `k`, `M`, ...) are powers of 1000. In a size, `B` (or `b`) is one byte. In a
rate the unit's case matters, as on network gear: `b` and `bit` are bits, `B` is bytes, so
`1Gb/s`, `1Gbit/s` and `1Gbps` are 125 MB/s while `1GB/s` and `1GBps` are 10^9 bytes/s.
A duration needs a unit, `s`, `ms` or `us` (also `µs`), unless it is 0: a bare `2` could mean
seconds or milliseconds, and guessing wrong is off by a thousand.
"""

from __future__ import annotations

import math
import re

from protos.human import format_rate, format_size  # noqa: F401 (the formatting half, shared with the agents)

UNLIMITED = ("unlimited", "none", "inf")  # words meaning "no limit" (returned as 0)

# Multipliers by lower-cased prefix: binary prefixes end in "i".
_PREFIX = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}

_NUMBER = r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_SIZE_RE = re.compile(_NUMBER + r"\s*(?P<prefix>[kmgt]i?)?(?P<unit>b)?", re.IGNORECASE)
_RATE_RE = re.compile(
    _NUMBER + r"\s*(?P<prefix>[kmgt]i?)?(?P<unit>bits?|b)?\s*(?P<per>/\s*s|ps)?", re.IGNORECASE
)

_DURATION_RE = re.compile(_NUMBER + r"\s*(?P<unit>s|ms|us|[\u00b5\u03bc]s)?", re.IGNORECASE)  # micro sign or mu
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6}  # by lower-cased unit
NO_DURATION = ("none",)  # words meaning "no delay" (returned as 0)


class UnitError(ValueError):
    """A size, rate or duration that cannot be parsed; the message quotes the value."""


def parse_size(value: str | int | float) -> int:
    """Bytes in `value` (`512MiB`, `1.5GB`, `1000`, `unlimited`); 0 means unlimited."""
    if isinstance(value, bool):
        raise UnitError(f"invalid size {value!r}: expected e.g. '512MiB', '2GiB' or 'unlimited'")
    if isinstance(value, int | float):
        return _whole_bytes(float(value), value)
    text = value.strip()
    if text.lower() in UNLIMITED:
        return 0
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise UnitError(f"invalid size {value!r}: expected e.g. '512MiB', '2GiB', '1.5GB' or 'unlimited'")
    prefix = (match["prefix"] or "").lower()
    return _whole_bytes(float(match["num"]) * _PREFIX[prefix], value)


def parse_rate(value: str | int | float) -> float:
    """Bytes per second in `value` (`50MB/s`, `1Gbit/s`, `800KiB/s`, `1000`); 0 means unlimited."""
    if isinstance(value, bool):
        raise UnitError(f"invalid rate {value!r}: expected e.g. '50MB/s', '1Gbit/s' or 'unlimited'")
    if isinstance(value, int | float):
        return _non_negative(float(value), value)
    text = value.strip()
    if text.lower() in UNLIMITED:
        return 0.0
    match = _RATE_RE.fullmatch(text)
    per = (match["per"] or "").replace(" ", "").lower() if match else ""
    if match is None or (not per and (match["prefix"] or match["unit"])):
        # A unit without "/s" is most likely a size given where a rate belongs.
        raise UnitError(
            f"invalid rate {value!r}: expected e.g. '50MB/s', '100Mbit/s', '800KiB/s' or 'unlimited'"
        )
    unit = match["unit"] or "B"  # a bare number (or prefix) per second counts bytes
    per_unit = 1 / 8 if unit == "b" or unit.lower().startswith("bit") else 1
    prefix = (match["prefix"] or "").lower()
    return _non_negative(float(match["num"]) * _PREFIX[prefix] * per_unit, value)


def parse_duration(value: str | int | float) -> float:
    """Seconds in `value` (`2ms`, `500us`, `0.002s`, `0`); 0 means no delay. Only 0 may omit the unit."""
    if isinstance(value, bool):
        raise UnitError(f"invalid duration {value!r}: expected e.g. '2ms', '500us' or '0.01s'")
    if isinstance(value, int | float):
        if value != 0:
            raise UnitError(f"invalid duration {value!r}: give a unit, e.g. '{value}ms' or '{value}s'")
        return 0.0
    text = value.strip()
    if text.lower() in NO_DURATION:
        return 0.0
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise UnitError(f"invalid duration {value!r}: expected e.g. '2ms', '500us', '0.01s' or '0'")
    if match["unit"] is None and float(match["num"]) != 0:
        raise UnitError(f"invalid duration {value!r}: give a unit, e.g. '{text}ms' or '{text}s'")
    return _non_negative(float(match["num"]) * _SECONDS[(match["unit"] or "s").lower()], value)


def _whole_bytes(amount: float, original: object) -> int:
    # Fractions of a byte (e.g. "1.3kB" = 1300, "0.1KiB" = 102.4) round to the nearest byte.
    return round(_non_negative(amount, original))


def _non_negative(amount: float, original: object) -> float:
    if not math.isfinite(amount) or amount < 0:
        raise UnitError(f"invalid value {original!r}: must be a finite number >= 0")
    return amount
