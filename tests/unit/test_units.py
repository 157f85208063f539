"""SIZE, RATE and DURATION parsing: binary and decimal suffixes, bits vs bytes, 'unlimited', units
required on durations, quoted errors."""

from __future__ import annotations

import pytest

from server.units import UnitError, format_rate, format_size, parse_duration, parse_rate, parse_size

KiB, MiB, GiB = 1024, 1024**2, 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * MiB),
        ("2GiB", 2 * GiB),
        ("1.5GB", 1_500_000_000),
        ("1000", 1000),
        ("0", 0),
        ("unlimited", 0),
        ("Unlimited", 0),
        ("1.5 gib", int(1.5 * GiB)),
        ("512mi", 512 * MiB),
        ("2G", 2_000_000_000),
        ("10kB", 10_000),
        ("10KiB", 10 * KiB),
        ("64B", 64),
        ("1TiB", 1024**4),
        (" 3MB ", 3_000_000),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50MB/s", 50e6),
        ("1Gbit/s", 125e6),
        ("100Mbit/s", 12.5e6),
        ("800KiB/s", 800 * 1024.0),
        ("1000", 1000.0),
        ("1000/s", 1000.0),
        ("unlimited", 0.0),
        ("0", 0.0),
        ("10 mB/s", 10e6),
        ("10 mb/s", 1.25e6),  # a lower-case b is a bit, as on network gear
        ("1Gb/s", 125e6),
        ("1Gbps", 125e6),
        ("1GBps", 1e9),
        ("1GB/s", 1e9),
        ("2.5GiB/s", 2.5 * GiB),
        ("8bit/s", 1.0),
        ("1 Gbits/s", 125e6),
    ],
)
def test_parse_rate(text: str, expected: float) -> None:
    assert parse_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["abc", "-5", "1.5.5GB", "", "12XB", "5 GiBs", "1e9"])
def test_bad_size_quotes_the_value(text: str) -> None:
    with pytest.raises(UnitError, match=repr(text).replace(".", r"\.")):
        parse_size(text)


@pytest.mark.parametrize("text", ["abc", "-5MB/s", "50MB", "1Gb", "1Gbit", "fast"])
def test_bad_rate_quotes_the_value(text: str) -> None:
    with pytest.raises(UnitError, match=repr(text)):
        parse_rate(text)


def test_sizes_round_to_whole_bytes() -> None:
    assert parse_size("0.1KiB") == 102
    assert isinstance(parse_size("1.5GB"), int)


def test_booleans_and_negative_numbers_are_refused() -> None:
    with pytest.raises(UnitError):
        parse_size(True)
    with pytest.raises(UnitError):
        parse_rate(-1.0)


def test_format_round_trips_for_people() -> None:
    assert format_size(512 * MiB) == "512 MiB"
    assert format_size(0) == "unlimited"
    assert format_rate(50e6) == "50 MB/s"
    assert format_rate(0) == "unlimited"
    assert parse_size(format_size(3 * GiB).replace(" ", "")) == 3 * GiB


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1ms", 1e-3),
        ("500us", 500e-6),
        ("500\u00b5s", 500e-6),
        ("0.002s", 0.002),
        ("2 MS", 0.002),
        (" 1.5s ", 1.5),
        ("0", 0.0),
        ("0.0", 0.0),
        ("none", 0.0),
        (0, 0.0),
    ],
)
def test_parse_duration(text: str | int, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["-1ms", "abc", "", "1e3ms", "5 min", "1m", "2ns"])
def test_bad_duration_quotes_the_value(text: str) -> None:
    with pytest.raises(UnitError, match=repr(text)):
        parse_duration(text)


@pytest.mark.parametrize("value", ["2", "0.5", 2, 0.002])
def test_a_duration_other_than_zero_needs_a_unit(value: str | float) -> None:
    # A bare 2 could be seconds or milliseconds: refused rather than guessed.
    with pytest.raises(UnitError, match="give a unit"):
        parse_duration(value)
    with pytest.raises(UnitError):
        parse_duration(True)
