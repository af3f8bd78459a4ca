"""ByteCache: eviction order per policy, byte budget, pins, stats, and a
hypothesis comparison of each policy against a plain O(n) reference model."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leptond.blocks.cache import ByteCache, LFUByteCache, LRUByteCache, make_policy_cache


def filled(policy: Any, cap: int, keys: str, **kw: Any) -> ByteCache[str, str]:
    cache: ByteCache[str, str] = ByteCache(cap, policy, **kw)
    for k in keys:
        cache.put(k, k.upper(), 1)
    return cache


# -- construction -------------------------------------------------------------


def test_policy_picks_implementation() -> None:
    assert isinstance(ByteCache(10, "lru"), LRUByteCache)
    assert isinstance(ByteCache(10, "lfu"), LFUByteCache)
    assert make_policy_cache("lfu", 10).policy == "lfu"
    typed = ByteCache[str, bytes](10, "lfu")
    typed.put("a", b"x", 1)
    assert isinstance(typed, LFUByteCache) and typed.get("a") == b"x"


def test_unknown_policy_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match="unknown cache policy 'arc': use one of lru, lfu"):
        make_policy_cache("arc", 10)
    with pytest.raises(ValueError, match="unknown cache policy"):
        ByteCache(10, "fifo")  # type: ignore[arg-type]


# -- LRU -------------------------------------------------------------------------


def test_lru_evicts_least_recently_used() -> None:
    cache = filled("lru", 3, "abc")
    assert cache.get("a") == "A"  # b is now the oldest
    cache.put("d", "D", 1)
    assert "b" not in cache
    assert sorted(cache.keys()) == ["a", "c", "d"]


def test_lru_put_of_existing_key_refreshes_it() -> None:
    cache = filled("lru", 3, "abc")
    cache.put("a", "A2", 1)
    cache.put("d", "D", 1)
    assert "b" not in cache and cache.get("a") == "A2"


# -- LFU -------------------------------------------------------------------------


def test_lfu_evicts_least_frequently_used() -> None:
    cache = filled("lfu", 3, "abc")
    for _ in range(3):
        cache.get("a")
    cache.get("c")
    cache.put("d", "D", 1)  # b has one use, the fewest
    assert "b" not in cache
    assert isinstance(cache, LFUByteCache) and cache.use_count("a") == 4


def test_lfu_ties_go_to_least_recent() -> None:
    cache = filled("lfu", 3, "abc")
    cache.get("b")
    cache.get("a")  # a and b have 2 uses; b was used earlier
    cache.get("c")
    cache.get("c")
    cache.put("d", "D", 1)
    assert "b" not in cache and {"a", "c", "d"} == set(cache.keys())
    cache.put("e", "E", 1)  # d (1 use) goes, not the new e
    assert "d" not in cache and "e" in cache


def test_lfu_new_item_is_not_its_own_victim() -> None:
    cache = filled("lfu", 2, "ab")
    for k in "ab":
        cache.get(k)
    cache.put("c", "C", 1)  # everything else has 2 uses, yet c gets in
    assert "c" in cache and len(cache) == 2


# -- byte budget -----------------------------------------------------------------


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_byte_budget_counts_sizes(policy: Any) -> None:
    evicted: list[str] = []
    cache: ByteCache[str, str] = ByteCache(10, policy, lambda k, v: evicted.append(k))
    cache.put("a", "A", 4)
    cache.put("b", "B", 4)
    assert cache.bytes_used == 8
    cache.put("c", "C", 5)  # needs a to go, and only a
    assert evicted == ["a"] and cache.bytes_used == 9
    cache.put("huge", "H", 11)  # bigger than the whole budget: not stored
    assert "huge" not in cache and evicted == ["a"]
    s = cache.stats()
    assert (s.evictions, s.evicted_bytes, s.bytes, s.items) == (1, 4, 9, 2)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_negative_size_is_refused(policy: Any) -> None:
    cache: ByteCache[str, str] = ByteCache(10, policy)
    with pytest.raises(ValueError, match="size must be >= 0"):
        cache.put("a", "A", -1)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("pinned", [False, True])
def test_negative_size_on_a_stored_key_changes_nothing(policy: Any, pinned: bool) -> None:
    # Lean path (nothing pinned) and general path (a pin elsewhere) alike.
    cache = filled(policy, 10, "ab")
    if pinned:
        cache.pin("b")
    with pytest.raises(ValueError, match="size must be >= 0"):
        cache.put("a", "A2", -1)
    assert cache.peek("a") == "A" and cache.size_of("a") == 1 and cache.bytes_used == 2


# -- pinning ---------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_pinned_items_are_never_evicted(policy: Any) -> None:
    cache = filled(policy, 3, "abc")
    cache.pin("a")
    cache.pin("a")  # counted
    for k in "defgh":
        cache.put(k, k, 1)
    assert "a" in cache
    cache.unpin("a")
    cache.put("i", "i", 1)
    assert "a" in cache  # still pinned once
    cache.unpin("a")
    with pytest.raises(KeyError, match="not pinned"):
        cache.unpin("a")


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_all_pinned_goes_over_budget_and_says_so(policy: Any) -> None:
    cache: ByteCache[str, str] = ByteCache(2, policy)
    for k in "abc":
        cache.pin(k)  # pinned before stored, as blocks being fetched are
        cache.put(k, k, 1)
    assert len(cache) == 3 and cache.over_budget and cache.stats().over_budget
    assert cache.stats().pinned_items == 3
    cache.put("x", "x", 1)  # unpinned and no room left: not stored
    assert "x" not in cache
    for k in "abc":
        cache.unpin(k)
    assert cache.bytes_used == 2 and not cache.over_budget


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_discard_removes_without_eviction_callback(policy: Any) -> None:
    evicted: list[str] = []
    cache: ByteCache[str, str] = ByteCache(3, policy, lambda k, v: evicted.append(k))
    cache.put("a", "A", 2)
    cache.discard("a")
    cache.discard("nope")
    assert "a" not in cache and cache.bytes_used == 0 and evicted == []


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_stats_count_hits_and_misses(policy: Any) -> None:
    cache = filled(policy, 3, "ab")
    cache.get("a")
    cache.get("a")
    cache.get("z")
    s = cache.stats()
    assert (s.hits, s.misses, s.items, s.bytes, s.capacity_bytes, s.policy) == (
        2,
        1,
        2,
        2,
        3,
        policy,
    )
    assert s.hit_ratio == pytest.approx(2 / 3)


# -- reference model ---------------------------------------------------------------


class ReferenceCache:
    """The obvious O(n) model: every item carries (uses, last touch); the
    victim is the unpinned item with the smallest key for the policy."""

    def __init__(self, cap: int, policy: str) -> None:
        self.cap = cap
        self.policy = policy
        self.items: dict[int, list[int]] = {}  # key -> [size, uses, touched]
        self.pins: dict[int, int] = {}
        self.clock = 0
        self.evicted: list[int] = []

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def used(self) -> int:
        return sum(v[0] for v in self.items.values())

    def evict_to(self, target: int) -> None:
        while self.used() > target:
            free = [k for k in self.items if k not in self.pins]
            if not free:
                return
            if self.policy == "lru":
                victim = min(free, key=lambda k: self.items[k][2])
            else:
                victim = min(free, key=lambda k: (self.items[k][1], self.items[k][2]))
            del self.items[victim]
            self.evicted.append(victim)

    def get(self, key: int) -> int | None:
        item = self.items.get(key)
        if item is None:
            return None
        item[1] += 1
        item[2] = self.tick()
        return key

    def put(self, key: int, size: int) -> None:
        self.items.pop(key, None)
        if size > self.cap:
            return
        pinned_bytes = sum(v[0] for k, v in self.items.items() if k in self.pins)
        if key not in self.pins and pinned_bytes + size > self.cap:
            return
        self.evict_to(self.cap - size)
        self.items[key] = [size, 1, self.tick()]

    def pin(self, key: int) -> None:
        self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, key: int) -> None:
        self.pins[key] -= 1
        if self.pins[key] == 0:
            del self.pins[key]
            if key in self.items:
                self.items[key][2] = self.tick()  # back as most recent
                self.evict_to(self.cap)

    def discard(self, key: int) -> None:
        self.items.pop(key, None)


ops = st.lists(
    st.tuples(
        st.sampled_from(["get", "put", "put", "pin", "unpin", "discard"]),
        st.integers(0, 7),
        st.integers(0, 4),
    ),
    max_size=80,
)


def check_lfu_buckets(cache: ByteCache[int, int]) -> None:
    """LFU's bucket list: counts strictly rising from the head, no empty
    bucket left linked (a lean put takes the head's first key without
    looking further), and every stored key in the bucket it is mapped to."""
    assert isinstance(cache, LFUByteCache)
    root, seen, last = cache._root, set(), 0
    bucket = root.next
    while bucket is not root:
        keys = set(bucket.items) | set(bucket.pinned or ())
        assert bucket.freq > last and keys, (last, bucket.freq, keys)
        assert all(cache._bucket_of[k] is bucket for k in keys)
        seen |= keys
        last, bucket = bucket.freq, bucket.next
    assert seen == set(cache.keys()) == set(cache._bucket_of)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("with_callback", [False, True])
@settings(max_examples=200, deadline=None)
@given(cap=st.integers(0, 8), script=ops)
def test_matches_reference_model(
    policy: Any, with_callback: bool, cap: int, script: list[tuple[str, int, int]]
) -> None:
    evicted: list[int] = []
    callback = (lambda k, v: evicted.append(k)) if with_callback else None
    cache: ByteCache[int, int] = ByteCache(cap, policy, callback)
    model = ReferenceCache(cap, policy)
    for op, key, size in script:
        if op == "get":
            assert cache.get(key) == model.get(key)
        elif op == "put":
            admitted = cache.admits(key, size)
            cache.put(key, key, size)
            model.put(key, size)
            assert (key in cache) == admitted
        elif op == "pin":
            cache.pin(key)
            model.pin(key)
        elif op == "unpin":
            if key not in model.pins:
                continue
            cache.unpin(key)
            model.unpin(key)
        else:
            cache.discard(key)
            model.discard(key)
        assert sorted(cache.keys()) == sorted(model.items)
        assert cache.bytes_used == model.used()
        assert all(cache.size_of(k) == v[0] for k, v in model.items.items())
        if isinstance(cache, LFUByteCache):
            check_lfu_buckets(cache)
        if with_callback:
            assert evicted == model.evicted
    assert cache.stats().evictions == len(model.evicted)


lean_ops = st.lists(
    st.tuples(
        st.sampled_from(["get", "get", "get", "put", "put", "discard"]),
        st.integers(0, 5),
        st.integers(0, 3),
    ),
    max_size=100,
)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@settings(max_examples=300, deadline=None)
@given(cap=st.integers(0, 6), script=lean_ops)
def test_hits_of_keys_that_leave_are_kept(
    policy: Any, cap: int, script: list[tuple[str, int, int]]
) -> None:
    """No pins and no callback, so only the lean paths run, and gets are
    frequent enough that keys which were hit leave in every way: evicted
    from a bucket that keeps other keys or empties, one victim or several,
    replaced, discarded.  LFU derives its hit count from the use counts, so
    each of those must keep the uses of the key that left."""
    cache: ByteCache[int, int] = ByteCache(cap, policy)
    model = ReferenceCache(cap, policy)
    hits = misses = 0
    for op, key, size in script:
        if op == "get":
            got = model.get(key)
            assert cache.get(key) == got
            hits += got is not None
            misses += got is None
        elif op == "put":
            cache.put(key, key, size)
            model.put(key, size)
        else:
            cache.discard(key)
            model.discard(key)
        s = cache.stats()
        assert (cache.hits, s.hits, s.misses) == (hits, hits, misses)
        assert cache.bytes_used == s.bytes == model.used()
        if isinstance(cache, LFUByteCache):
            assert all(cache.use_count(k) == v[1] for k, v in model.items.items())


def test_lfu_keeps_the_hits_of_a_victim_whose_bucket_keeps_others() -> None:
    """The common eviction, one victim from a bucket that keeps other keys,
    here with a victim that was hit: its use must stay in the hit count."""
    cache: ByteCache[str, str] = ByteCache(2, "lfu")
    for key in "ab":
        cache.put(key, key, 1)
    for key in "ab":
        assert cache.get(key) == key
    cache.put("c", "c", 1)  # a and b both have two uses; a got there first
    assert sorted(cache.keys()) == ["b", "c"]
    assert (cache.use_count("b"), cache.use_count("c")) == (2, 1)
    assert cache.hits == cache.stats().hits == 2


pin_heavy_ops = st.lists(
    st.tuples(
        st.sampled_from(["get", "get", "put", "put", "pin", "unpin", "unpin", "discard"]),
        st.integers(0, 5),
        st.integers(0, 3),
    ),
    max_size=120,
)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("with_callback", [False, True])
@settings(max_examples=200, deadline=None)
@given(cap=st.integers(0, 6), script=pin_heavy_ops)
def test_counters_match_model_as_pins_come_and_go(
    policy: Any, with_callback: bool, cap: int, script: list[tuple[str, int, int]]
) -> None:
    """``get``/``put`` switch between lean and general paths as the first pin
    is taken and the last released; every counter must carry across."""
    evicted: list[int] = []
    callback = (lambda k, v: evicted.append(k)) if with_callback else None
    cache: ByteCache[int, int] = ByteCache(cap, policy, callback)
    model = ReferenceCache(cap, policy)
    hits = misses = evicted_bytes = 0
    for op, key, size in script:
        sizes = {k: v[0] for k, v in model.items.items()}
        before = len(model.evicted)
        if op == "get":
            got = model.get(key)
            assert cache.get(key) == got
            hits += got is not None
            misses += got is None
        elif op == "put":
            sizes[key] = size  # a replaced item is not evicted, so this is safe
            cache.put(key, key, size)
            model.put(key, size)
        elif op == "pin":
            cache.pin(key)
            model.pin(key)
        elif op == "unpin":
            if key not in model.pins:
                continue
            cache.unpin(key)
            model.unpin(key)
        else:
            cache.discard(key)
            model.discard(key)
        evicted_bytes += sum(sizes[k] for k in model.evicted[before:])
        # The lean put assumes no pins and no callback, the lean get no pins.
        lean = not model.pins
        assert cache.get == (cache._fast_get if lean else cache._get)
        assert cache.put == (cache._fast_put if lean and not with_callback else cache._put_careful)
        s = cache.stats()
        assert (s.hits, s.misses) == (hits, misses) == (cache.hits, cache.misses)
        assert (s.evictions, s.evicted_bytes) == (len(model.evicted), evicted_bytes)
        assert (cache.evictions, cache.evicted_bytes) == (s.evictions, s.evicted_bytes)
        assert s.bytes == cache.bytes_used == model.used()
        assert s.pinned_items == sum(1 for k in model.pins if k in model.items)
        assert sorted(cache.keys()) == sorted(model.items)
        if isinstance(cache, LFUByteCache):
            assert all(cache.use_count(k) == v[1] for k, v in model.items.items())
            check_lfu_buckets(cache)
        if with_callback:
            assert evicted == model.evicted
