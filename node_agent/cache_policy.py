"""Which resident expert to drop: bookkeeping only, no tensors (the buffer moves the bytes)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Set
from typing import Generic, Protocol, TypeVar

K = TypeVar("K")


class EvictionPolicy(Protocol[K]):
    def on_insert(self, key: K) -> None: ...
    def on_access(self, key: K) -> None: ...
    def on_remove(self, key: K) -> None: ...
    def victims(self, candidates: Set[K]) -> Iterable[K]:
        """Resident keys in the order they should be evicted, restricted to `candidates`."""
        ...


class LRUPolicy(Generic[K]):
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()  # oldest first

    def on_insert(self, key: K) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: K) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: K) -> None:
        self._order.pop(key, None)

    def victims(self, candidates: Set[K]) -> Iterable[K]:
        return [k for k in self._order if k in candidates]
