"""Byte-budgeted caches with LRU or LFU eviction, O(1) per operation.

One implementation per policy serves both the master's in-memory hot-block
cache (values are block bytes) and the agent's disk cache (values are small
markers; ``on_evict`` deletes the file).

Invariants kept by every operation:

* ``bytes_used`` is the sum of the sizes of the stored items.
* A pinned key (pin count > 0) is never evicted.  Pins are counted per key and
  may be taken before the key is stored, so a block can be protected while it
  is still being fetched.
* Room for a new item is made before it goes in, so a put never evicts the
  item it stores.  An unpinned item that would not fit even after evicting
  every unpinned item is not stored; a pinned one is stored anyway, and the
  cache is then over its budget (``over_budget``) until pins are released.

``on_evict`` runs after the evicted item has left the cache; it must not call
back into the same cache.  Not thread-safe: one owner (an event loop or one
thread) calls it, as ``BlockStore`` does.  Values must not be ``None``: ``get`` returns
``None`` for a miss.

Why ``get`` and ``put`` are closures
------------------------------------

A hit or a miss costs a few hundred nanoseconds, most of it C-level dict
work, so each attribute access on ``self`` is a visible share of the rest.
Each policy therefore builds its ``get`` and a lean ``put`` as closures
(module functions ``_lru_paths`` / ``_lfu_paths``) and stores them in
instance slots: the hot paths read and write the counters and the byte total
as closure cells and call pre-bound dict methods, and touch no attribute of
the cache.  The cold paths (pins, ``discard``, ``stats``, eviction with a
callback) reach the same cells through small accessor closures: ``_totals``,
``_used`` (the byte total alone) and ``_account``, and for LFU ``_gone``,
since LFU derives its hit count from the use counts (see ``_lfu_paths``).

The puts keep the free room (capacity less bytes used) rather than the bytes
used, so one compare of the new size against it decides whether to evict,
and they count what goes in rather than what is evicted: evictions and
evicted bytes follow (what went in, less what left by a replacement or a
discard, less what is still here), so an eviction updates no counter of its
own.  The eviction loop is then as short as it can be, and the counters
are updated once per put, outside any branch.

The lean ``put`` is only correct while nothing is pinned and there is no
``on_evict``, and LFU's lean ``get`` while nothing is pinned (LRU's ``get``
copes with pins at no cost).  Rather than test for that on every call,
``pin`` and ``unpin`` switch ``self.get`` and ``self.put`` to the general
paths when the first pin is taken and back when the last one is released
(``_choose_paths``); with a callback, ``put`` is the general one throughout.
So read ``cache.get`` / ``cache.put`` afresh: a reference kept across the
first ``pin`` or the last ``unpin`` may be the wrong one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, NamedTuple, TypeVar

K = TypeVar("K")
V = TypeVar("V")

Policy = Literal["lru", "lfu"]
POLICIES: tuple[str, ...] = ("lru", "lfu")


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    evicted_bytes: int
    bytes: int
    items: int
    capacity_bytes: int
    policy: str
    pinned_items: int = 0

    @property
    def over_budget(self) -> bool:
        return self.bytes > self.capacity_bytes

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class _Totals(NamedTuple):
    """The counters kept in a policy's closure cells, as the cold paths see them."""

    hits: int
    misses: int
    used: int  # bytes_used
    evictions: int
    evicted_bytes: int


# What happened to an item, as the cold paths report it to ``account``.
_STORED = 0  # it went in
_DROPPED = 1  # it left, replaced or discarded: not an eviction
_EVICTED = 2


class _Paths(NamedTuple, Generic[K, V]):
    """What a policy's closure factory hands to ``ByteCache._bind``."""

    get: Callable[[K], V | None]
    fast_get: Callable[[K], V | None]  # valid only with no pins
    fast_put: Callable[[K, V, int], None]  # valid only with no pins and no on_evict
    totals: Callable[[], _Totals]
    used: Callable[[], int]  # bytes_used alone: cheaper than ``totals`` for LFU
    account: Callable[[int, int], None]  # (_STORED, _DROPPED or _EVICTED; the item's size)


def _bad_size(size: int) -> ValueError:
    return ValueError(f"item size must be >= 0, got {size}")


class ByteCache(Generic[K, V]):
    """A cache bounded by the total size of its items.

    ``ByteCache(capacity_bytes, "lru" | "lfu", on_evict)`` returns the
    implementation for that policy; both share this interface.  ``get`` and
    ``put`` are per-instance closures (see the module docstring for why);
    everything else is an ordinary method.
    """

    __slots__ = (
        "_account",
        "_capacity",
        "_fast_get",
        "_fast_put",
        "_get",
        "_on_evict",
        "_pinned_bytes",
        "_pins",
        "_totals",
        "_used",
        "_values",
        "get",
        "put",
    )
    policy: str = ""

    # Set by ``_bind``, and switched by ``_choose_paths``: ``get`` between
    # ``_fast_get`` and the general ``_get``, ``put`` between ``_fast_put``
    # and the general ``_put_careful``.
    get: Callable[[K], V | None]
    put: Callable[[K, V, int], None]
    _get: Callable[[K], V | None]
    _fast_get: Callable[[K], V | None]
    _fast_put: Callable[[K, V, int], None]
    _totals: Callable[[], _Totals]
    _used: Callable[[], int]
    _account: Callable[[int, int], None]

    def __new__(
        cls,
        capacity_bytes: int,
        policy: Policy = "lru",
        on_evict: Callable[[K, V], None] | None = None,
    ) -> ByteCache[K, V]:
        if cls is ByteCache:
            impl = _POLICY_CLASSES.get(policy)
            if impl is None:
                raise ValueError(_unknown_policy(policy))
            return object.__new__(impl)
        return object.__new__(cls)

    def __init__(
        self,
        capacity_bytes: int,
        policy: Policy = "lru",
        on_evict: Callable[[K, V], None] | None = None,
    ) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self._capacity = capacity_bytes
        self._on_evict = on_evict
        self._pinned_bytes = 0  # bytes of stored items that are pinned
        self._values: dict[K, V] = {}  # every stored item, pinned or not
        self._pins: dict[K, int] = {}  # pin counts; a key may be pinned before it is stored

    def _bind(self, paths: _Paths[K, V]) -> None:
        """Install a policy's closures; each policy's __init__ ends with this."""
        self._get = paths.get
        self._fast_get = paths.fast_get
        self._fast_put = paths.fast_put
        self._totals = paths.totals
        self._used = paths.used
        self._account = paths.account
        self._choose_paths()

    def _choose_paths(self) -> None:
        """Point ``get`` and ``put`` at the lean closures where they are valid
        (``get``: nothing pinned; ``put``: nothing pinned and no callback),
        else at the general paths.  Called whenever pins come or go, so the
        lean paths need no check of their own."""
        if self._pins:
            self.get = self._get
            self.put = self._put_careful
        else:
            self.get = self._fast_get
            self.put = self._fast_put if self._on_evict is None else self._put_careful

    # -- counters, kept in the policy's closure cells -----------------------

    @property
    def hits(self) -> int:
        return self._totals().hits

    @property
    def misses(self) -> int:
        return self._totals().misses

    @property
    def evictions(self) -> int:
        return self._totals().evictions

    @property
    def evicted_bytes(self) -> int:
        return self._totals().evicted_bytes

    @property
    def bytes_used(self) -> int:
        return self._used()

    # -- shared, policy-independent parts ---------------------------------

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[K]:
        return list(self._values)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._values))  # a snapshot: safe to discard while iterating

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def over_budget(self) -> bool:
        return self.bytes_used > self._capacity

    def peek(self, key: K) -> V | None:
        """The value without counting a use or a hit."""
        return self._values.get(key)

    def admits(self, key: K, size: int) -> bool:
        """Would ``put(key, _, size)`` store the item (evicting as needed)?"""
        if not 0 <= size <= self._capacity:
            return False
        return key in self._pins or self._pinned_bytes + size <= self._capacity

    def pin_count(self, key: K) -> int:
        return self._pins.get(key, 0)

    def pin(self, key: K) -> None:
        """Protect ``key`` from eviction; counted, so pin twice -> unpin twice."""
        pins = self._pins
        count = pins.get(key, 0)
        pins[key] = count + 1
        if len(pins) == 1 and count == 0:
            self._choose_paths()  # the first pin: leave the lean paths
        if count == 0 and key in self._values:
            self._pinned_bytes += self._to_pinned(key)

    def unpin(self, key: K) -> None:
        pins = self._pins
        count = pins.get(key, 0)
        if count == 0:
            raise KeyError(f"unpin of a key that is not pinned: {key!r}")
        if count > 1:
            pins[key] = count - 1
            return
        del pins[key]
        if key in self._values:
            self._pinned_bytes -= self._to_evictable(key)
            if self.bytes_used > self._capacity:
                self._evict_to(self._capacity)
        if not pins:
            # The last pin: back to the lean paths.  The lean put assumes the
            # cache is within budget, which holds now: only stored pinned
            # items can hold it over, and if this key was the last of them
            # the eviction above has just brought it back.
            self._choose_paths()

    def discard(self, key: K) -> None:
        """Remove ``key`` if stored (not an eviction: ``on_evict`` is not called).

        Its pin count, if any, is kept: pins belong to the caller, not the item.
        """
        if self._values.pop(key, None) is not None:
            size = self._forget(key)
            self._account(_DROPPED, size)
            if key in self._pins:
                self._pinned_bytes -= size

    def stats(self) -> CacheStats:
        totals = self._totals()
        pins = self._pins  # usually few: count over them, not over the items
        return CacheStats(
            hits=totals.hits,
            misses=totals.misses,
            evictions=totals.evictions,
            evicted_bytes=totals.evicted_bytes,
            bytes=totals.used,
            items=len(self._values),
            capacity_bytes=self._capacity,
            policy=self.policy,
            pinned_items=sum(1 for k in pins if k in self._values),
        )

    def _put_careful(self, key: K, value: V, size: int) -> None:
        """``put`` while pins or a callback exist: the general path."""
        if size < 0:
            raise _bad_size(size)  # before a stored value is replaced
        if key in self._values:
            self.discard(key)  # replacing: the new value starts afresh
        if self.bytes_used + size > self._capacity and not self._admit(key, size):
            return
        self._values[key] = value
        self._account(_STORED, size)
        pinned = key in self._pins
        if pinned:
            self._pinned_bytes += size
        self._insert(key, size, pinned)

    def _admit(self, key: K, size: int) -> bool:
        """Make room for a new item of ``size``; False if it is not to be stored.

        Slow path of ``put``, taken only when the item does not fit as is
        (so ``size`` > 0: ``_put_careful`` refuses negative sizes first).
        """
        cap = self._capacity
        if size > cap:
            return False  # would evict everything and still not fit
        pinned = key in self._pins
        if not pinned and self._pinned_bytes + size > cap:
            return False  # pinned items leave no room: evict nothing for it
        self._evict_to(cap - size)
        return True

    def _evict_to(self, target_bytes: int) -> None:
        """Evict until at most ``target_bytes`` are used or only pinned items
        are left.  Counters are updated before each callback, so the cache is
        consistent even if ``on_evict`` raises."""
        values = self._values
        on_evict = self._on_evict
        while self.bytes_used > target_bytes:
            victim = self._pop_victim()
            if victim is None:
                return  # everything left is pinned: over budget for now
            key, size = victim
            value = values.pop(key)
            self._account(_EVICTED, size)
            if on_evict is not None:
                on_evict(key, value)

    # -- policy hooks ------------------------------------------------------

    def size_of(self, key: K) -> int | None:
        raise NotImplementedError

    def _insert(self, key: K, size: int, pinned: bool) -> None:
        """Add a new key (already in ``_values``) as the newest of its kind."""
        raise NotImplementedError

    def _to_pinned(self, key: K) -> int:
        """Move a stored key out of the eviction order; returns its size."""
        raise NotImplementedError

    def _to_evictable(self, key: K) -> int:
        """Move a stored key back into the eviction order; returns its size."""
        raise NotImplementedError

    def _forget(self, key: K) -> int:
        """Drop ``key`` from the policy's structures; returns its size."""
        raise NotImplementedError

    def _pop_victim(self) -> tuple[K, int] | None:
        """Remove and return the next evictable key and its size, or None."""
        raise NotImplementedError


# -- LRU -----------------------------------------------------------------------


def _lru_paths(values: dict[K, V], order: OrderedDict[K, int], cap: int) -> _Paths[K, V]:
    """The LRU hot paths and their counters, as closures over ``values`` (key ->
    value) and ``order`` (evictable key -> size, least recent first)."""
    hits = misses = 0
    room = cap  # capacity - bytes used: one compare decides whether to evict
    # Evictions are not counted as they happen (see ``totals``): only what
    # goes in, and what leaves otherwise (rare: a replacement or a discard).
    stored = stored_bytes = dropped = dropped_bytes = 0
    move_to_end = order.move_to_end
    popitem = order.popitem
    order_pop = order.pop

    def get(key: K) -> V | None:
        # ``in`` then ``[]`` rather than one ``values.get``: a miss (the
        # common case under a cold trace) then costs an operator, not a call.
        nonlocal hits, misses
        if key in values:
            hits += 1
            try:
                move_to_end(key)
            except KeyError:
                pass  # pinned: outside the eviction order until unpinned
            return values[key]
        misses += 1
        return None

    def fast_put(key: K, value: V, size: int) -> None:
        # Only while nothing is pinned and there is no callback: then every
        # stored key is in ``order`` and the cache is within budget (room >= 0).
        nonlocal room, stored, stored_bytes, dropped, dropped_bytes
        if key in values:
            if size < 0:
                raise _bad_size(size)  # before the old value goes
            # discard, written out: the new value starts as most recent.
            del values[key]
            old_size = order_pop(key)
            room += old_size
            dropped += 1
            dropped_bytes += old_size
        if size > room:
            if size > cap:
                return  # would evict everything and still not fit
            # Terminates before the order runs dry, since size <= cap.
            victim, victim_size = popitem(False)
            del values[victim]
            room += victim_size
            while size > room:  # more than one victim: items of mixed sizes
                victim, victim_size = popitem(False)
                del values[victim]
                room += victim_size
        elif size < 0:
            raise _bad_size(size)
        values[key] = value
        order[key] = size
        room -= size
        stored += 1
        stored_bytes += size

    def totals() -> _Totals:
        used = cap - room
        # Whatever went in, did not leave otherwise and is not here was evicted.
        evictions = stored - dropped - len(values)
        return _Totals(hits, misses, used, evictions, stored_bytes - dropped_bytes - used)

    def account(event: int, size: int) -> None:
        nonlocal room, stored, stored_bytes, dropped, dropped_bytes
        if event == _STORED:
            room -= size
            stored += 1
            stored_bytes += size
            return
        room += size
        if event == _DROPPED:
            dropped += 1
            dropped_bytes += size

    def used() -> int:
        return cap - room

    # ``get`` copes with pinned keys (they sit outside ``order``), so it
    # serves as the lean one too.
    return _Paths(get, get, fast_put, totals, used, account)


class LRUByteCache(ByteCache[K, V]):
    """Evictable keys in an OrderedDict (key -> size), least recent first;
    pinned keys sit apart so eviction never has to step over them.

    Why not a plain dict, ``d[k] = d.pop(k)`` for a use and ``next(iter(d))``
    for the victim: every pop leaves a deleted slot that stays in the dict's
    entry table until the next resize, and ``next(iter(d))`` steps over all
    of those before the oldest live key, so eviction is not O(1); on the
    benchmark's Zipf trace that version ran at about 0.65x of this one.
    """

    __slots__ = ("_order", "_pinned")
    policy = "lru"

    def __init__(
        self,
        capacity_bytes: int,
        policy: Policy = "lru",
        on_evict: Callable[[K, V], None] | None = None,
    ) -> None:
        super().__init__(capacity_bytes, policy, on_evict)
        self._order: OrderedDict[K, int] = OrderedDict()
        self._pinned: dict[K, int] = {}
        self._bind(_lru_paths(self._values, self._order, capacity_bytes))

    def size_of(self, key: K) -> int | None:
        size = self._order.get(key)
        return size if size is not None else self._pinned.get(key)

    def _insert(self, key: K, size: int, pinned: bool) -> None:
        if pinned:
            self._pinned[key] = size
        else:
            self._order[key] = size

    def _to_pinned(self, key: K) -> int:
        size = self._pinned[key] = self._order.pop(key)
        return size

    def _to_evictable(self, key: K) -> int:
        # Unpinning counts as a use: the item comes back as most recent.
        size = self._order[key] = self._pinned.pop(key)
        return size

    def _forget(self, key: K) -> int:
        size = self._order.pop(key, None)
        return size if size is not None else self._pinned.pop(key)

    def _pop_victim(self) -> tuple[K, int] | None:
        return self._order.popitem(False) if self._order else None


# -- LFU -----------------------------------------------------------------------


class _Bucket:
    """All keys with one use count, in a doubly linked list ordered by count.

    ``items`` maps evictable keys to their sizes, least recent first.
    ``pinned`` (made on first need: most buckets never see a pin) holds pinned
    keys, which keep counting uses so that they come back in the right place.
    """

    __slots__ = ("freq", "items", "next", "pinned", "prev")

    def __init__(self, freq: int) -> None:
        self.freq = freq
        self.items: OrderedDict[Any, int] = OrderedDict()
        self.pinned: dict[Any, int] | None = None
        self.prev: _Bucket = self
        self.next: _Bucket = self

    def pinned_map(self) -> dict[Any, int]:
        if self.pinned is None:
            self.pinned = {}
        return self.pinned


def _lfu_paths(
    values: dict[K, V], bucket_of: dict[K, _Bucket], root: _Bucket, cap: int
) -> tuple[
    _Paths[K, V],
    Callable[[int, _Bucket], _Bucket],
    Callable[[_Bucket], None],
    Callable[[int], None],
]:
    """The LFU hot paths and their counters, as closures over ``values``,
    ``bucket_of`` (key -> its bucket) and the bucket list at ``root``.

    Also returns ``new_bucket(freq, prev)`` and ``drop_bucket(bucket)`` for
    the cold paths, which share the one spare bucket kept in a cell here,
    and ``gone(freq)``, which they call for a key that leaves (see below).

    Hits are not counted: every hit adds one to its key's use count and
    nothing else does, so the hits are the uses of the stored keys (count
    less one, summed over the buckets when asked) plus those of the keys
    that have left, which ``gone_hits`` adds up as each key leaves.  A hit
    then updates no counter; ``hits += 1`` on a count past CPython's cached
    small ints allocates a new int each time.  A key usually leaves from the
    lowest bucket with a count of one, which adds nothing.
    """
    misses = gone_hits = 0
    room = cap  # capacity - bytes used: one compare decides whether to evict
    # Evictions are not counted as they happen (see ``totals``): only what
    # goes in, and what leaves otherwise (rare: a replacement or a discard).
    stored = stored_bytes = dropped = dropped_bytes = 0
    spare: _Bucket | None = None  # one emptied bucket, so moving up rarely allocates
    # Called unbound: a method looked up on an OrderedDict is not specialised
    # by CPython 3.11 (its instances have a ``__dict__``), and the hot paths
    # call them on a different bucket each time, so they cannot be pre-bound.
    od_pop = OrderedDict.pop
    od_popitem = OrderedDict.popitem

    def new_bucket(freq: int, prev: _Bucket) -> _Bucket:
        nonlocal spare
        bucket = spare
        if bucket is None:
            bucket = _Bucket(freq)
        else:
            spare = None
            bucket.freq = freq
        nxt = prev.next
        bucket.prev = prev
        bucket.next = nxt
        prev.next = bucket
        nxt.prev = bucket
        return bucket

    def drop_bucket(bucket: _Bucket) -> None:
        nonlocal spare
        prev = bucket.prev
        nxt = bucket.next
        prev.next = nxt
        nxt.prev = prev
        bucket.pinned = None
        spare = bucket

    def fast_get(key: K) -> V | None:
        # Only while nothing is pinned: then every stored key is in its
        # bucket's ``items`` and no bucket holds pinned keys.
        nonlocal misses, spare
        if key not in values:  # an operator, not a call: see LRU's get
            misses += 1
            return None
        bucket = bucket_of[key]
        freq = bucket.freq + 1
        nxt = bucket.next
        items = bucket.items
        if nxt.freq != freq:
            if len(items) == 1:
                bucket.freq = freq  # alone in its bucket: renumber, no move
                return values[key]
            # new_bucket(freq, bucket), written out: this is the hot path.
            fresh = spare
            if fresh is None:
                fresh = _Bucket(freq)
            else:
                spare = None
                fresh.freq = freq
            fresh.prev = bucket
            fresh.next = nxt
            bucket.next = nxt.prev = fresh
            nxt = fresh
        nxt.items[key] = od_pop(items, key)
        bucket_of[key] = nxt
        if not items:
            # drop_bucket(bucket), written out.  Its ``pinned``, if any, is
            # an empty leftover, which every path treats like None.
            prev = bucket.prev
            prev.next = nxt
            nxt.prev = prev
            spare = bucket
        return values[key]

    def get(key: K) -> V | None:
        # The general get, for while pins exist: pinned keys keep counting
        # uses in their bucket's ``pinned`` map.
        nonlocal misses
        value = values.get(key)
        if value is None:
            misses += 1
            return None
        bucket = bucket_of[key]
        freq = bucket.freq + 1
        nxt = bucket.next
        items = bucket.items
        pinned = bucket.pinned
        if nxt.freq != freq:
            if len(items) + (len(pinned) if pinned else 0) == 1:
                bucket.freq = freq
                return value
            nxt = new_bucket(freq, bucket)
        size = items.pop(key, None)
        if size is None:
            nxt.pinned_map()[key] = pinned.pop(key)  # type: ignore[union-attr]
        else:
            nxt.items[key] = size
        bucket_of[key] = nxt
        if not items and not pinned:
            drop_bucket(bucket)
        return value

    def fast_put(key: K, value: V, size: int) -> None:
        # Only while nothing is pinned and there is no callback: then no
        # bucket holds a pinned key and the cache is within budget.
        nonlocal room, stored, stored_bytes, dropped, dropped_bytes, gone_hits
        if key in values:
            if size < 0:
                raise _bad_size(size)  # before the old value goes
            # discard, written out: the new value starts with one use.
            del values[key]
            bucket = bucket_of.pop(key)
            gone_hits += bucket.freq - 1
            items = bucket.items
            old_size = items.pop(key)
            room += old_size
            dropped += 1
            dropped_bytes += old_size
            if not items:
                drop_bucket(bucket)
        head = root.next
        if size > room:  # then size > 0, since room >= 0
            if size > cap:
                return
            # With no pins the lowest bucket always has evictable keys.
            items = head.items
            victim, victim_size = od_popitem(items, False)
            del bucket_of[victim]
            del values[victim]
            room += victim_size
            freq = head.freq
            if items and size <= room:
                # The common case: one victim, from a bucket that keeps others.
                if freq != 1:  # rare: most victims were never hit
                    gone_hits += freq - 1  # the victim's uses leave with it
                    head = new_bucket(1, root)
            else:
                if freq != 1:
                    gone_hits += freq - 1
                if not items and size <= room:
                    # Common too (new keys are the usual victims, so the
                    # lowest bucket is often a single key): the emptied lowest
                    # bucket takes the new key, renumbered to one use, instead
                    # of being unlinked and another linked in its place.
                    head.freq = 1
                else:
                    if not items:
                        drop_bucket(head)
                        head = root.next
                    while size > room:  # more than one victim: items of mixed sizes
                        items = head.items
                        victim, victim_size = od_popitem(items, False)
                        gone_hits += head.freq - 1
                        if not items:
                            drop_bucket(head)
                            head = root.next
                        del bucket_of[victim]
                        del values[victim]
                        room += victim_size
                    if head.freq != 1:
                        head = new_bucket(1, root)
        elif size < 0:
            raise _bad_size(size)
        elif head.freq != 1:
            head = new_bucket(1, root)
        values[key] = value
        room -= size
        stored += 1
        stored_bytes += size
        head.items[key] = size
        bucket_of[key] = head

    def totals() -> _Totals:
        used = cap - room
        # Whatever went in, did not leave otherwise and is not here was evicted.
        evictions = stored - dropped - len(values)
        # The uses of the stored keys, pinned or not (a walk over the buckets,
        # which are far fewer than the keys), and of those that have left.
        hits = gone_hits
        bucket = root.next
        while bucket is not root:
            pinned = bucket.pinned
            hits += (bucket.freq - 1) * (len(bucket.items) + (len(pinned) if pinned else 0))
            bucket = bucket.next
        return _Totals(hits, misses, used, evictions, stored_bytes - dropped_bytes - used)

    def used() -> int:
        return cap - room

    def account(event: int, size: int) -> None:
        nonlocal room, stored, stored_bytes, dropped, dropped_bytes
        if event == _STORED:
            room -= size
            stored += 1
            stored_bytes += size
            return
        room += size
        if event == _DROPPED:
            dropped += 1
            dropped_bytes += size

    def gone(freq: int) -> None:
        """A key with use count ``freq`` left: keep its hits."""
        nonlocal gone_hits
        gone_hits += freq - 1

    paths = _Paths(get, fast_get, fast_put, totals, used, account)
    return paths, new_bucket, drop_bucket, gone


class LFUByteCache(ByteCache[K, V]):
    """Frequency buckets in a linked list whose head has the lowest count, so
    the victim (least recent key of the lowest count) is found without a heap
    or a scan.  Ties in count go to the least recently used.

    A dict of count -> bucket plus a min-count pointer would need a scan to
    find the next minimum when a discard or pin empties the lowest bucket;
    the linked list always has it at ``root.next``.  The one walk left is over
    buckets that hold only pinned keys (at most one per pinned key), and only
    while evicting.  One emptied bucket is kept as a spare, so moving a key up
    a count rarely allocates.

    Bucket members are OrderedDicts for the same reason as in
    ``LRUByteCache``: the lowest bucket is a FIFO that loses its oldest key on
    every eviction, and a plain dict would make finding that key a walk over
    deleted slots.
    """

    __slots__ = ("_bucket_of", "_drop_bucket", "_gone", "_new_bucket", "_root")
    policy = "lfu"

    def __init__(
        self,
        capacity_bytes: int,
        policy: Policy = "lfu",
        on_evict: Callable[[K, V], None] | None = None,
    ) -> None:
        super().__init__(capacity_bytes, policy, on_evict)
        self._bucket_of: dict[K, _Bucket] = {}
        self._root = _Bucket(0)  # sentinel: root.next is the lowest count
        paths, self._new_bucket, self._drop_bucket, self._gone = _lfu_paths(
            self._values, self._bucket_of, self._root, capacity_bytes
        )
        self._bind(paths)

    def use_count(self, key: K) -> int:
        bucket = self._bucket_of.get(key)
        return bucket.freq if bucket is not None else 0

    def size_of(self, key: K) -> int | None:
        bucket = self._bucket_of.get(key)
        if bucket is None:
            return None
        size = bucket.items.get(key)
        return size if size is not None else bucket.pinned_map().get(key)

    def _insert(self, key: K, size: int, pinned: bool) -> None:
        root = self._root
        head = root.next
        if head.freq != 1:
            head = self._new_bucket(1, root)
        if pinned:
            head.pinned_map()[key] = size
        else:
            head.items[key] = size
        self._bucket_of[key] = head

    def _to_pinned(self, key: K) -> int:
        bucket = self._bucket_of[key]
        size = bucket.pinned_map()[key] = bucket.items.pop(key)
        return size

    def _to_evictable(self, key: K) -> int:
        # Back as the most recent key of its count.
        bucket = self._bucket_of[key]
        size = bucket.items[key] = bucket.pinned_map().pop(key)
        return size

    def _forget(self, key: K) -> int:
        bucket = self._bucket_of.pop(key)
        self._gone(bucket.freq)
        size = bucket.items.pop(key, None)
        if size is None:
            size = bucket.pinned_map().pop(key)
        if not bucket.items and not bucket.pinned:
            self._drop_bucket(bucket)
        return size

    def _pop_victim(self) -> tuple[K, int] | None:
        root = self._root
        bucket = root.next
        while bucket is not root and not bucket.items:
            bucket = bucket.next  # only pinned keys here
        if bucket is root:
            return None
        key, size = bucket.items.popitem(False)
        self._gone(bucket.freq)
        if not bucket.items and not bucket.pinned:
            self._drop_bucket(bucket)
        del self._bucket_of[key]
        return key, size


_POLICY_CLASSES: dict[str, type[ByteCache[Any, Any]]] = {
    "lru": LRUByteCache,
    "lfu": LFUByteCache,
}


def _unknown_policy(policy: object) -> str:
    return f"unknown cache policy {policy!r}: use one of {', '.join(POLICIES)}"


def make_policy_cache(
    policy: str,
    capacity_bytes: int,
    on_evict: Callable[[Any, Any], None] | None = None,
) -> ByteCache[Any, Any]:
    """Build a cache from a policy name read from config or the command line."""
    impl = _POLICY_CLASSES.get(policy)
    if impl is None:
        raise ValueError(_unknown_policy(policy))
    return impl(capacity_bytes, policy, on_evict)  # type: ignore[arg-type]
