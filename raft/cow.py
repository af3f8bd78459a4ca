"""Copy-on-write maps: the replicated state publishes immutable views cheaply.

Readers (the scheduling loop, API reads, metrics, `snapshot save`, the
background snapshot writer) work on a `StateView` (raft/view.py) without
holding the apply lock. A view holds a read-only copy of each of the state's
maps, made only when one is asked for, so the records in it are shared with
the live state.

A copy costs O(keys written), not O(keys): a map keeps a `base` (a plain
dict copy no one writes to) and notes the keys written since; its frozen
copy is that base plus a small overlay of those keys (`FrozenMap`). Once the
overlay would pass 1/32 of the map, the next copy is a whole new base, so a
write costs O(1) amortized whatever the size of the state. Small maps are
simply copied. A FrozenMap iterates in the live map's order (insertion
order, as a dict), so a snapshot lists records exactly as the live state
does.

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

from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

_MISSING: Any = object()
_GONE: Any = object()  # in an overlay: deleted since the base
# Maps up to this size are copied whole; above it, a new base is made once
# the keys written since the last one pass 1/REBASE_DIVISOR of the map.
SMALL_MAP = 2048
REBASE_DIVISOR = 32


class FrozenMap(Mapping[K, V]):
    """A read-only map: a shared base dict plus the keys written since it.

    Iterates in the order the live map had when this was made: base keys
    that were never deleted since (in base order), then the keys inserted
    since, in insertion order (a dict moves a deleted and re-inserted key to
    the end, and so does this)."""

    __slots__ = ("_base", "_gone", "_len", "_new", "_over")

    def __init__(
        self,
        base: dict[K, V],
        over: dict[K, Any],
        gone: frozenset[K],
        new: tuple[K, ...],
        length: int,
    ) -> None:
        self._base = base
        self._over = over  # key -> value now, or _GONE
        self._gone = gone  # base keys deleted since the base (re-inserted or not)
        self._new = new  # keys inserted since the base, in order
        self._len = length

    def __getitem__(self, key: K) -> V:
        v = self._over.get(key, _MISSING)
        if v is _MISSING:
            return self._base[key]
        if v is _GONE:
            raise KeyError(key)
        return v

    def get(self, key: K, default: Any = None) -> Any:
        v = self._over.get(key, _MISSING)
        if v is _MISSING:
            return self._base.get(key, default)
        return default if v is _GONE else v

    def __contains__(self, key: object) -> bool:
        v = self._over.get(key, _MISSING)  # type: ignore[arg-type]
        if v is _MISSING:
            return key in self._base
        return v is not _GONE

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[K]:
        gone = self._gone
        if gone:
            for k in self._base:
                if k not in gone:
                    yield k
        else:
            yield from self._base
        yield from self._new

    def values(self) -> Iterator[V]:  # type: ignore[override]
        over, gone = self._over, self._gone
        for k, v in self._base.items():
            if k in gone:
                continue
            w = over.get(k, _MISSING)
            yield v if w is _MISSING else w
        for k in self._new:
            yield over[k]

    def items(self) -> Iterator[tuple[K, V]]:  # type: ignore[override]
        over, gone = self._over, self._gone
        for k, v in self._base.items():
            if k in gone:
                continue
            w = over.get(k, _MISSING)
            yield k, (v if w is _MISSING else w)
        for k in self._new:
            yield k, over[k]


class CowMap(dict[K, V], Generic[K, V]):
    """A dict that knows which of its values no published view shares.

    Reads are plain dict reads. Every write marks the map changed since the
    last `frozen()`; `writable(key)` returns a value that may be mutated.
    """

    __slots__ = ("_base", "_changed", "_clone", "_frozen", "_gone", "_new", "_own", "_touched")

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
        # Since the base: keys written (replaced, inserted or deleted), base
        # keys deleted, and keys inserted (in order).
        self._base: dict[K, V] | None = None
        self._touched: set[K] = set()
        self._gone: set[K] = set()
        self._new: dict[K, None] = {}

    @classmethod
    def adopt(cls, items: dict[K, V], clone: Callable[[V], V] | None = None) -> CowMap[K, V]:
        """A map with the contents of `items`, which becomes its first base:
        the caller hands it over and never writes to it again. Its first
        frozen copy then costs nothing (a state just restored from a
        snapshot is not copied again for the first view)."""
        m = cls(items, clone)
        m._base = items
        m._changed = True
        return m

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
            self._touched.add(key)
        self._changed = True
        return value

    def frozen(self) -> Mapping[K, V]:
        """A read-only copy as of now; the same object while nothing changed.

        From here on every value is shared with that copy."""
        self._own.clear()
        if not self._changed and self._frozen is not None:
            return self._frozen
        self._changed = False
        n = len(self)
        touched = self._touched
        if self._base is not None and not touched:
            self._frozen = MappingProxyType(self._base)
        elif self._base is None or n <= SMALL_MAP or len(touched) * REBASE_DIVISOR > n:
            self._base = dict.copy(self)
            touched.clear()
            self._gone.clear()
            self._new.clear()
            self._frozen = MappingProxyType(self._base)
        else:
            get = dict.get
            self._frozen = FrozenMap(
                self._base,
                {k: get(self, k, _GONE) for k in touched},
                frozenset(self._gone),
                tuple(self._new),
                n,
            )
        return self._frozen

    def plain(self) -> dict[K, V]:
        """A plain dict copy (for encoders that do not take a dict subclass)."""
        return dict.copy(self)

    # -- every write marks the map changed ------------------------------------
    def __setitem__(self, key: K, value: V) -> None:
        # The value is new (no view holds it): callers insert fresh records.
        if key not in self:
            self._new[key] = None
        dict.__setitem__(self, key, value)
        self._own.add(key)
        self._touched.add(key)
        self._changed = True

    def __delitem__(self, key: K) -> None:
        dict.__delitem__(self, key)
        self._deleted(key)

    def _deleted(self, key: K) -> None:
        self._own.discard(key)
        self._touched.add(key)
        self._new.pop(key, None)
        if self._base is not None and key in self._base:
            self._gone.add(key)
        self._changed = True

    def pop(self, key: K, default: Any = _MISSING) -> Any:
        if key in self:
            value = dict.pop(self, key)
            self._deleted(key)
            return value
        if default is _MISSING:
            raise KeyError(key)
        return default

    def setdefault(self, key: K, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def clear(self) -> None:
        for k in list(self):
            del self[k]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def popitem(self) -> tuple[K, V]:
        k, v = dict.popitem(self)
        self._deleted(k)
        return k, v

    def __ior__(self, other: Any) -> CowMap[K, V]:  # type: ignore[override,misc]
        self.update(other)
        return self

    def __reduce__(self) -> Any:
        raise TypeError("CowMap is not pickled: snapshots are msgpack of records")


def frozen_all(maps: Iterable[CowMap[Any, Any]]) -> list[Mapping[Any, Any]]:
    """`m.frozen()` of each map, in order. A map not written since its last
    copy has no value of its own (`_own` is empty: every write marks it
    changed) and its copy is the one it made then: taken as it is, without a
    call. A view is made after every apply, and most of its maps are
    unchanged by any one command."""
    return [m.frozen() if m._changed else m._frozen for m in maps]  # type: ignore[misc]


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
