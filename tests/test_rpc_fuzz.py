"""Every RPC method of a real master, called with random arguments by every
kind of caller (an admin, another master, a node, a join token), answers with
a result or a typed one-line error: never "internal error", and the master
logs no traceback.

`logs` with `rank: "abc"` used to answer "internal error" and leave a
traceback in the master's log; the arguments here are drawn from the names
the methods read, with values of every type and range.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leptond import api
from leptond.agents import AgentRegistry
from leptond.blockservice import BlockService
from leptond.wire.connection import Connection, open_connection
from leptond.wire.errors import RpcError
from leptond.wire.tokens import CLUSTER_KEY_ID, cluster_psk, parse_token, read_secret_file
from tests.harness import Cluster

# Methods the master serves besides the api table (master.py registers them).
MASTER_METHODS = ("member_hello", "member_health")
# Codes a caller can act on; "internal" (a bug) and "protocol" are not among them.
TYPED = frozenset(
    {
        "bad_request",
        "not_found",
        "forbidden",
        "unauthenticated",
        "conflict",
        "not_leader",
        "no_quorum",
        "timeout",
        "unavailable",
        "unknown_method",
        "unregistered",
        "not_started",
        "quota",
        "pending_limit",
        "store_full",
        "too_large",
        "busy",
        "unschedulable",
        "disk_full",
        "leader_starting",
    }
)
# Every argument name a method reads, so that the random maps hit them.
ARG_NAMES = [
    "job_id", "job_ids", "rank", "follow", "offset", "tail_lines", "stream", "timestamps",
    "spec", "name", "rid", "queue_anyway", "all", "limit", "state", "user", "local",
    "node", "node_id", "deadline_s", "force", "reason", "addr", "health", "data", "role",
    "id", "ids", "ttl_s", "uses", "z", "manifest", "raft_addr", "rpc_addr", "http_addr",
    "host", "gpus", "cache", "running", "exited", "events", "yes", "set", "unset", "paged",
    "after", "page_bytes",
]  # fmt: skip


def method_names() -> list[str]:
    # The handler tables only need their owner to name bound methods.
    agents = AgentRegistry.handlers(AgentRegistry.__new__(AgentRegistry))
    blocks = BlockService.handlers(BlockService.__new__(BlockService))
    return sorted({*api._REGISTRY, *agents, *blocks, *MASTER_METHODS})


def caller_of(method: str) -> str:
    """Who a method is for: a person (any role: the admin), a node, a master, a join token."""
    if method in api._REGISTRY:
        return "join" if api._REGISTRY[method][1] == "join" else "admin"
    if method.startswith(("peer_", "member_")):
        return "cluster"
    if method in ("blocks_missing", "block_put", "manifest_put"):
        return "admin"
    return "node"


def read_names(method: str) -> list[str]:
    """The argument names a method's handler reads (`a.get("x")`, `a["x"]`)."""
    agents = AgentRegistry.handlers(AgentRegistry.__new__(AgentRegistry))
    blocks = BlockService.handlers(BlockService.__new__(BlockService))
    fn: Any = api._REGISTRY[method][0] if method in api._REGISTRY else None
    fn = fn or getattr(agents.get(method) or blocks.get(method), "__func__", None)
    try:
        source = inspect.getsource(fn) if fn is not None else ""
    except (OSError, TypeError):
        source = ""
    return sorted(set(re.findall(r'a(?:\.get\(|\[)"(\w+)"', source)))


def scalars(job_id: str) -> st.SearchStrategy[Any]:
    return (
        st.none()
        | st.booleans()
        # What msgpack can carry: 64-bit integers, signed or not.
        | st.integers(-(2**63), 2**64 - 1)
        | st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64 - 1, -(2**63)])
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=12)
        | st.sampled_from(["", "abc", "\U0001f600" * 3, "x" * 300, job_id, f"{job_id}.0"])
        | st.binary(max_size=12)
    )


def arguments(method: str, job_id: str) -> st.SearchStrategy[Any]:
    names = read_names(method)
    keys = st.sampled_from(names) if names else st.sampled_from(ARG_NAMES)
    junk = st.recursive(
        scalars(job_id),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                keys | st.sampled_from(ARG_NAMES) | st.text(max_size=4), inner, max_size=3
            )
        ),
        max_leaves=8,
    )
    # Mostly maps of the names the method reads, sometimes anything at all.
    return st.dictionaries(keys | st.sampled_from(ARG_NAMES), junk, max_size=6) | junk


class Callers:
    """One open connection per kind of caller, reopened when a call closed it."""

    def __init__(self, c: Cluster, keys: dict[str, tuple[str, bytes]], job_id: str) -> None:
        self.c = c
        self.keys = keys
        self.job_id = job_id
        self.conns: dict[str, Connection] = {}
        self.loop = asyncio.new_event_loop()

    def conn(self, who: str) -> Connection:
        conn = self.conns.get(who)
        if conn is None or conn.is_closing():
            key_id, psk = self.keys[who]
            port = self.c.masters[0].rpc
            conn = self.loop.run_until_complete(
                open_connection("127.0.0.1", port, key_id=key_id, psk=psk, timeout_s=10)
            )
            self.conns[who] = conn
        return conn

    def call(self, who: str, method: str, args: Any, stream: bool) -> Any:
        conn = self.conn(who)

        async def go() -> Any:
            if not stream:
                return await conn.call(method, args, timeout_s=30)
            items = []
            async for item in conn.stream(method, args, item_timeout_s=30):
                items.append(item)
                if len(items) > 3:
                    break
            return items

        return self.loop.run_until_complete(go())

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


@pytest.fixture(scope="module")
def callers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callers]:
    c = Cluster(tmp_path_factory.mktemp("fuzz") / "cluster", n_masters=1, ttl_s=3.0)
    try:
        c.start_masters()
        join = parse_token(c.join_token_file().read_text())
        keys = {
            "admin": (parse_token(c.admin_token).id, parse_token(c.admin_token).psk),
            "cluster": (CLUSTER_KEY_ID, cluster_psk(read_secret_file(c.secret))),
            "join": (join.id, join.psk),
        }
        # A node credential of its own (no agent runs: nothing else uses it).
        res = c.rpc("node_join", {"node_id": "fuzz-node"}, token=join)
        cred = parse_token(res["credential"])
        keys["node"] = (cred.id, cred.psk)
        # A job to point at, so that calls naming it go past "no such job".
        job_id = c.rpc("submit", {"spec": {"argv": ["true"]}})["id"]
        cl = Callers(c, keys, job_id)
        try:
            yield cl
        finally:
            cl.close()
    finally:
        c.close()


def check_answer(method: str, args: Any, call: Any) -> None:
    try:
        call()
    except RpcError as exc:
        assert exc.code in TYPED, f"{method}({args!r}) -> {exc.code}: {exc.message}"
        assert "\n" not in exc.message, f"{method}({args!r}) -> {exc.message!r}"
        assert "internal" not in exc.message, f"{method}({args!r}) -> {exc.message!r}"


@pytest.mark.parametrize("method", method_names())
def test_every_method_answers_random_arguments_with_a_result_or_a_typed_error(
    callers: Callers, method: str
) -> None:
    stream = method in {n for n, (_, _, _, is_stream) in api._REGISTRY.items() if is_stream}
    # Mostly the caller the method is for, so that calls get past its role check.
    own = [caller_of(method)] * 6

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        derandomize=True,
    )
    @given(who=st.sampled_from(own + sorted(callers.keys)), args=arguments(method, callers.job_id))
    def one(who: str, args: Any) -> None:
        check_answer(method, args, lambda: callers.call(who, method, args, stream=stream))

    log_file = callers.c.masters[0].proc.log
    seen = log_file.stat().st_size
    one()
    with open(log_file, "rb") as f:
        f.seek(seen)
        log = f.read().decode(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]
    assert "internal error" not in log


def test_logs_with_a_rank_that_is_not_a_number_is_a_bad_request(callers: Callers) -> None:
    with pytest.raises(RpcError) as exc:
        callers.call("admin", "logs", {"job_id": callers.job_id, "rank": "abc"}, stream=True)
    assert exc.value.code == "bad_request", exc.value.message
    assert "rank" in exc.value.message


PEOPLE_METHODS = sorted(m for m, (_, role, _, _) in api._REGISTRY.items() if role != "join")


@pytest.mark.parametrize("method", PEOPLE_METHODS)
def test_each_argument_of_the_wrong_type_is_a_bad_request(callers: Callers, method: str) -> None:
    stream = api._REGISTRY[method][3]
    for name in read_names(method):
        for wrong in ([[1]], {"x": 1}):
            with pytest.raises(RpcError) as exc:
                callers.call("admin", method, {name: wrong}, stream=stream)
            assert exc.value.code == "bad_request", (method, name, exc.value.message)
            assert "\n" not in exc.value.message
