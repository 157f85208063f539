"""Which resident expert to drop: bookkeeping only, no tensors (the buffer moves the bytes)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Set
from typing import Generic, Protocol, TypeVar

from protos.ids import ExpertId, SliceId

Layered = ExpertId | SliceId  # what LayerCyclicPolicy orders: anything of a layer

K = TypeVar("K")


class EvictionPolicy(Protocol[K]):
    def on_insert(self, key: K, ahead: bool = False) -> None:
        """`key` is now resident; `ahead`: read before anyone needed it (a prefetch)."""
        ...

    def on_access(self, key: K) -> None: ...
    def on_remove(self, key: K) -> None: ...
    def victims(self, candidates: Set[K]) -> Iterable[K]:
        """Resident keys in the order they should be evicted, restricted to `candidates`."""
        ...


class LRUPolicy(Generic[K]):
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()  # oldest first

    def on_insert(self, key: K, ahead: bool = False) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: K) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: K) -> None:
        self._order.pop(key, None)

    def victims(self, candidates: Set[K]) -> Iterable[K]:
        return [k for k in self._order if k in candidates]


class LayerCyclicPolicy:
    """Belady's rule for a model that is read layer by layer, request after request: the expert
    whose layer comes round again last goes first (LRU evicts exactly the experts needed next,
    since the least recently used layer is the one about to be read again).

    The position in the cycle is the layer of the latest access or demand insert, that is of the
    work being done. A read-ahead insert (a prefetch nobody waits for yet) does not move it: it
    brings in a layer still to come, and taking that as the position would make the prefetched
    layer's own resident experts, needed next, the first victims. Among experts of one layer, the
    least recently used goes first.
    """

    def __init__(self, num_layers: int) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.current = 0  # the layer being worked on
        self._lru: LRUPolicy[Layered] = LRUPolicy()

    def on_insert(self, key: Layered, ahead: bool = False) -> None:
        if not ahead:
            self.current = key.layer
        self._lru.on_insert(key)

    def on_access(self, key: Layered) -> None:
        self.current = key.layer
        self._lru.on_access(key)

    def on_remove(self, key: Layered) -> None:
        self._lru.on_remove(key)

    def next_use(self, key: Layered) -> int:
        """Layers until the key's layer is read again (0: the next layer)."""
        return (key.layer - self.current - 1) % self.num_layers

    def victims(self, candidates: Set[Layered]) -> Iterable[Layered]:
        order = list(self._lru.victims(candidates))  # LRU first within a layer
        return sorted(order, key=lambda k: -self.next_use(k))  # stable: keeps LRU order on ties
