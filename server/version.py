"""The installed potluck's version, for `potluck --version`, the API's OpenAPI document and the
build-info metric."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def potluck_version() -> str:
    """The installed package's version (pyproject.toml), or 'unknown' when run from a bare checkout."""
    try:
        return version("potluck")
    except PackageNotFoundError:
        return "unknown"
