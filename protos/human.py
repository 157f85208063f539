"""Sizes and rates for people, in logs on both ends of the wire: `512 MiB`, `50 MB/s`. The
parsing half (flags and inventories) is the server's, in server/units.py; 0 means unlimited in
both, as in the agents' DeviceProfile."""

from __future__ import annotations

_BINARY = (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024))
_DECIMAL = (("T", 1000**4), ("G", 1000**3), ("M", 1000**2), ("k", 1000))


def format_size(num_bytes: int) -> str:
    """`num_bytes` for people: '512 MiB', '1.5 GiB'; 0 is 'unlimited'."""
    return _scaled(num_bytes, _BINARY, "B") or f"{num_bytes} B"


def format_rate(bytes_per_s: float) -> str:
    """`bytes_per_s` for people: '50 MB/s'; 0 is 'unlimited'."""
    return _scaled(bytes_per_s, _DECIMAL, "B/s") or f"{bytes_per_s:.4g} B/s"


def _scaled(value: float, scales: tuple[tuple[str, int], ...], unit: str) -> str | None:
    if value == 0:
        return "unlimited"
    for prefix, scale in scales:
        if value >= scale:
            return f"{value / scale:.4g} {prefix}{unit}"
    return None
