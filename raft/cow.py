"""Copy-on-write maps: the replicated state publishes immutable views cheaply.

Readers (the scheduling loop, API reads, metrics, `snapshot save`, the
background snapshot writer) work on a `StateView` (raft/view.py) without
holding the apply lock. A view holds shallow copies of the state's maps,
made only when one is asked for and only of the maps written since the last
view, so the records in it are shared with the live state.

The rule that keeps a view unchanged: apply never mutates a record (or a set
in `node_tasks`) that a view may share. It asks the map for a writable one
first (`CowMap.writable`), which copies the record once per view generation
and puts the copy in the live map; records created since the last view are
already private and are returned as they are. Insertions and deletions only
touch the live map. tests/test_state_views.py checks the rule by applying
random commands after a view was taken.

Apply-side rule for callers: take the writable record *before* reading the
fields you are about to change, and pass that object on; a reference taken
earlier may be the shared, stale one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

_MISSING: Any = object()


class CowMap(dict[K, V], Generic[K, V]):
    """A dict that knows which of its values no published view shares.

    Reads are plain dict reads. Every write marks the map changed since the
    last `frozen()`; `writable(key)` returns a value that may be mutated.
    """

    __slots__ = ("_changed", "_clone", "_frozen", "_own")

    def __init__(
        self,
        items: Mapping[K, V] | Iterable[tuple[K, V]] = (),
        clone: Callable[[V], V] | None = None,
    ) -> None:
        super().__init__(items)
        self._clone = clone
        # Keys whose current value was put here since the last frozen(): no
        # view holds it, so it may be mutated in place.
        self._own: set[K] = set()
        self._changed = True
        self._frozen: Mapping[K, V] | None = None

    # -- copy on write ------------------------------------------------------
    def writable(self, key: K) -> V:
        """The value under `key`, safe to mutate (a private copy if a view may share it)."""
        value = dict.__getitem__(self, key)
        if key not in self._own:
            if self._clone is None:
                raise TypeError("this map's values are immutable; put a new one instead")
            value = self._clone(value)
            dict.__setitem__(self, key, value)
            self._own.add(key)
        self._changed = True
        return value

    def frozen(self) -> Mapping[K, V]:
        """A read-only copy as of now; the same object while nothing changed.

        From here on every value is shared with that copy."""
        if self._changed or self._frozen is None:
            self._frozen = MappingProxyType(dict.copy(self))
            self._changed = False
        self._own.clear()
        return self._frozen

    def plain(self) -> dict[K, V]:
        """A plain dict copy (for encoders that do not take a dict subclass)."""
        return dict.copy(self)

    # -- every write marks the map changed ------------------------------------
    def __setitem__(self, key: K, value: V) -> None:
        # The value is new (no view holds it): callers insert fresh records.
        dict.__setitem__(self, key, value)
        self._own.add(key)
        self._changed = True

    def __delitem__(self, key: K) -> None:
        dict.__delitem__(self, key)
        self._own.discard(key)
        self._changed = True

    def pop(self, key: K, default: Any = _MISSING) -> Any:
        if key in self:
            self._own.discard(key)
            self._changed = True
            return dict.pop(self, key)
        if default is _MISSING:
            raise KeyError(key)
        return default

    def setdefault(self, key: K, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def clear(self) -> None:
        dict.clear(self)
        self._own.clear()
        self._changed = True

    def update(self, *args: Any, **kwargs: Any) -> None:
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def popitem(self) -> tuple[K, V]:
        k, v = dict.popitem(self)
        self._own.discard(k)
        self._changed = True
        return k, v

    def __ior__(self, other: Any) -> CowMap[K, V]:  # type: ignore[override,misc]
        self.update(other)
        return self

    def __reduce__(self) -> Any:
        raise TypeError("CowMap is not pickled: snapshots are msgpack of records")


def add_to(m: CowMap[K, set[Any]], key: K, item: Any) -> None:
    """Add `item` to the set under `key` (created when missing), copy on write."""
    if key in m:
        m.writable(key).add(item)
    else:
        m[key] = {item}


def discard_from(m: CowMap[K, set[Any]], key: K, item: Any) -> None:
    """Remove `item` from the set under `key`, if both are there, copy on write."""
    s = m.get(key)
    if s is not None and item in s:
        m.writable(key).discard(item)
