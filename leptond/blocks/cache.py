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
back into the same cache.  Values must not be ``None``: ``get`` returns
``None`` for a miss.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

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


class ByteCache(Generic[K, V]):
    """A cache bounded by the total size of its items.

    ``ByteCache(capacity_bytes, "lru" | "lfu", on_evict)`` returns the
    implementation for that policy; both share this interface.  The hot paths
    (``get``, ``put``) are written out in each policy with local names and no
    per-operation allocation: they are what the benchmark measures.
    """

    __slots__ = (
        "_bytes",
        "_capacity",
        "_careful",
        "_on_evict",
        "_pinned_bytes",
        "_pins",
        "_values",
        "evicted_bytes",
        "evictions",
        "hits",
        "misses",
    )
    policy: str = ""

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
        self._bytes = 0
        self._pinned_bytes = 0  # bytes of stored items that are pinned
        self._values: dict[K, V] = {}  # every stored item, pinned or not
        self._pins: dict[K, int] = {}  # pin counts; a key may be pinned before it is stored
        # True while pins or a callback exist: ``put`` then takes the general
        # path instead of the lean one that the benchmark measures.
        self._careful = on_evict is not None
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.evicted_bytes = 0

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
    def bytes_used(self) -> int:
        return self._bytes

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def over_budget(self) -> bool:
        return self._bytes > self._capacity

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
        self._careful = True
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
        self._careful = bool(pins) or self._on_evict is not None
        if key in self._values:
            self._pinned_bytes -= self._to_evictable(key)
            if self._bytes > self._capacity:
                self._evict_to(self._capacity)

    def discard(self, key: K) -> None:
        """Remove ``key`` if stored (not an eviction: ``on_evict`` is not called).

        Its pin count, if any, is kept: pins belong to the caller, not the item.
        """
        if self._values.pop(key, None) is not None:
            size = self._forget(key)
            self._bytes -= size
            if key in self._pins:
                self._pinned_bytes -= size

    def stats(self) -> CacheStats:
        pins = self._pins  # usually few: count over them, not over the items
        return CacheStats(
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
            evicted_bytes=self.evicted_bytes,
            bytes=self._bytes,
            items=len(self._values),
            capacity_bytes=self._capacity,
            policy=self.policy,
            pinned_items=sum(1 for k in pins if k in self._values),
        )

    def _admit(self, key: K, size: int) -> bool:
        """Make room for a new item of ``size``; False if it is not to be stored.

        Slow path of ``put``, taken only when the item does not fit as is.
        """
        if size < 0:
            raise ValueError(f"item size must be >= 0, got {size}")
        cap = self._capacity
        if size > cap:
            return False  # would evict everything and still not fit
        pinned = key in self._pins
        if not pinned and self._pinned_bytes + size > cap:
            return False  # pinned items leave no room: evict nothing for it
        self._evict_to(cap - size)
        return True

    # -- policy hooks ------------------------------------------------------

    def get(self, key: K) -> V | None:
        raise NotImplementedError

    def put(self, key: K, value: V, size: int) -> None:
        raise NotImplementedError

    def size_of(self, key: K) -> int | None:
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

    def _evict_to(self, target_bytes: int) -> None:
        """Evict until at most ``target_bytes`` are used or only pinned items
        are left.  Fields are updated before each callback, so the cache is
        consistent even if ``on_evict`` raises."""
        values = self._values
        on_evict = self._on_evict
        while self._bytes > target_bytes:
            victim = self._pop_victim()
            if victim is None:
                return  # everything left is pinned: over budget for now
            key, size = victim
            value = values.pop(key)
            self._bytes -= size
            self.evictions += 1
            self.evicted_bytes += size
            if on_evict is not None:
                on_evict(key, value)


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

    def get(self, key: K) -> V | None:
        value = self._values.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        try:
            self._order.move_to_end(key)
        except KeyError:
            pass  # pinned: outside the eviction order until unpinned
        return value

    def put(self, key: K, value: V, size: int) -> None:
        values = self._values
        if key in values:
            self.discard(key)  # replacing: the new value starts as most recent
        if self._careful:
            self._put_careful(key, value, size)
            return
        used = self._bytes + size
        cap = self._capacity
        order = self._order
        if used > cap:  # then size > 0: without pins the cache is within budget
            if size > cap:
                return  # would evict everything and still not fit
            # No pins, no callback: evict with locals, write the fields once.
            # Terminates before the order runs dry, since size <= cap.
            victim, victim_size = order.popitem(False)
            del values[victim]
            used -= victim_size
            freed = victim_size
            count = 1
            while used > cap:  # more than one victim: items of mixed sizes
                victim, victim_size = order.popitem(False)
                del values[victim]
                used -= victim_size
                freed += victim_size
                count += 1
            self.evictions += count
            self.evicted_bytes += freed
        elif size < 0:
            self._admit(key, size)  # raises
        values[key] = value
        order[key] = size
        self._bytes = used

    def _put_careful(self, key: K, value: V, size: int) -> None:
        needs_room = self._bytes + size > self._capacity or size < 0
        if needs_room and not self._admit(key, size):
            return
        self._values[key] = value
        self._bytes += size
        if key in self._pins:
            self._pinned[key] = size
            self._pinned_bytes += size
        else:
            self._order[key] = size

    def size_of(self, key: K) -> int | None:
        size = self._order.get(key)
        return size if size is not None else self._pinned.get(key)

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

    __slots__ = ("_bucket_of", "_root", "_spare")
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
        self._spare: _Bucket | None = None

    def use_count(self, key: K) -> int:
        bucket = self._bucket_of.get(key)
        return bucket.freq if bucket is not None else 0

    def _new_bucket(self, freq: int, prev: _Bucket) -> _Bucket:
        bucket = self._spare
        if bucket is None:
            bucket = _Bucket(freq)
        else:
            self._spare = None
            bucket.freq = freq
        nxt = prev.next
        bucket.prev = prev
        bucket.next = nxt
        prev.next = bucket
        nxt.prev = bucket
        return bucket

    def _drop_bucket(self, bucket: _Bucket) -> None:
        prev = bucket.prev
        nxt = bucket.next
        prev.next = nxt
        nxt.prev = prev
        bucket.pinned = None
        self._spare = bucket

    def get(self, key: K) -> V | None:
        value = self._values.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        bucket_of = self._bucket_of
        bucket = bucket_of[key]
        freq = bucket.freq + 1
        nxt = bucket.next
        items = bucket.items
        pinned = bucket.pinned
        if nxt.freq != freq:
            if len(items) + (len(pinned) if pinned else 0) == 1:
                bucket.freq = freq  # alone in its bucket: renumber, no move
                return value
            # _new_bucket(freq, bucket), written out: this is the hot path.
            spare = self._spare
            if spare is None:
                spare = _Bucket(freq)
            else:
                self._spare = None
                spare.freq = freq
            spare.prev = bucket
            spare.next = nxt
            bucket.next = nxt.prev = spare
            nxt = spare
        size = items.pop(key, None)
        if size is None:
            nxt.pinned_map()[key] = pinned.pop(key)  # type: ignore[union-attr]
        else:
            nxt.items[key] = size
        bucket_of[key] = nxt
        if not items and not pinned:
            # _drop_bucket(bucket), written out.
            prev = bucket.prev
            prev.next = nxt
            nxt.prev = prev
            bucket.pinned = None
            self._spare = bucket
        return value

    def put(self, key: K, value: V, size: int) -> None:
        values = self._values
        if key in values:
            self.discard(key)  # replacing: the new value starts with one use
        if self._careful:
            self._put_careful(key, value, size)
            return
        used = self._bytes + size
        cap = self._capacity
        root = self._root
        bucket_of = self._bucket_of
        if used > cap:  # then size > 0: without pins the cache is within budget
            if size > cap:
                return
            # No pins, no callback: evict with locals, write the fields once.
            # With no pins the lowest bucket always has evictable keys.
            count = 0
            freed = 0
            while used > cap:
                bucket = root.next
                items = bucket.items
                victim, victim_size = items.popitem(False)
                if not items:
                    self._drop_bucket(bucket)
                del bucket_of[victim]
                del values[victim]
                used -= victim_size
                freed += victim_size
                count += 1
            self.evictions += count
            self.evicted_bytes += freed
        elif size < 0:
            self._admit(key, size)  # raises
        values[key] = value
        self._bytes = used
        head = root.next
        if head.freq != 1:
            head = self._new_bucket(1, root)
        head.items[key] = size
        bucket_of[key] = head

    def _put_careful(self, key: K, value: V, size: int) -> None:
        needs_room = self._bytes + size > self._capacity or size < 0
        if needs_room and not self._admit(key, size):
            return
        self._values[key] = value
        self._bytes += size
        root = self._root
        head = root.next
        if head.freq != 1:
            head = self._new_bucket(1, root)
        if key in self._pins:
            head.pinned_map()[key] = size
            self._pinned_bytes += size
        else:
            head.items[key] = size
        self._bucket_of[key] = head

    def size_of(self, key: K) -> int | None:
        bucket = self._bucket_of.get(key)
        if bucket is None:
            return None
        size = bucket.items.get(key)
        return size if size is not None else bucket.pinned_map().get(key)

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
