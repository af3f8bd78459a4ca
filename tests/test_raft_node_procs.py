"""Raft fault tests with real processes on 127.0.0.1: kill -9, SIGSTOP, power loss.

Each node is ``tests/raft_kv_proc.py``; a client thread keeps proposing
appends, retrying each one with the SAME request id until it is acknowledged.
Afterwards every acknowledged value must be in the log exactly once.
"""

from __future__ import annotations

import collections
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.raft_kv_proc import Cluster, Member, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, 3)
    try:
        c.start()
        yield c
    finally:
        c.stop()  # SIGCONT + SIGKILL every process by pid, even on failure


class Loader:
    """Client thread: sequential appends, each retried until acknowledged."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.acked: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> Loader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                value = f"v{i}"
                if self.cluster.write(
                    f"rid-{i}", value, deadline_s=60.0, timeout_s=2.0, stop=self._stop.is_set
                ):
                    self.acked.append(value)
                i += 1
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def wait_acks(self, more_than: int, timeout_s: float = 25.0) -> None:
        wait_until(
            lambda: len(self.acked) > more_than,
            timeout_s,
            f"more than {more_than} acknowledged writes",
        )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        if self.error is not None:
            raise self.error


def assert_every_ack_once(cluster: Cluster, acked: list[str]) -> None:
    """Every member converges to one log holding each acked value exactly once."""

    def logs() -> list[list[str]] | None:
        dumps = [m.try_request({"op": "dump"}, 3.0) for m in cluster.members]
        if any(d is None for d in dumps):
            return None
        return [d["lists"].get("log", []) for d in dumps if d is not None]

    converged = wait_until(
        lambda: (ls := logs()) and all(x == ls[0] for x in ls) and ls,
        20.0,
        "all members to hold the same log",
    )
    log = converged[0]
    counts = collections.Counter(log)
    assert [v for v, n in counts.items() if n > 1] == [], "values applied twice"
    missing = [v for v in acked if counts[v] != 1]
    assert missing == [], f"acknowledged writes lost: {missing[:10]}"


def caught_up(m: Member, leader: Member) -> bool:
    st, lst = m.status(), leader.status()
    return bool(st and lst and st["last_applied"] >= lst["commit_index"] - 5)


def test_leader_kill9_three_times_under_load(cluster: Cluster) -> None:
    with Loader(cluster) as load:
        load.wait_acks(20)
        for _ in range(3):
            leader = cluster.leader()
            n = len(load.acked)
            leader.kill()
            load.wait_acks(n + 15)  # a new leader is serving
            leader.start(cluster.addrs)  # same data dir: comes back from its journal
            new_leader = cluster.leader()
            wait_until(
                lambda m=leader, nl=new_leader: caught_up(m, nl), 20.0, "restarted node to catch up"
            )
    assert_every_ack_once(cluster, load.acked)


def test_kill9_all_under_load_then_power_loss_restart(cluster: Cluster) -> None:
    with Loader(cluster) as load:
        load.wait_acks(40)
        for m in cluster.members:
            m.kill()
    acked = list(load.acked)
    for m in cluster.members:
        # Power loss on every machine: whatever was not fsynced is gone.
        m.truncate_to_synced()
        m.start(cluster.addrs)
    cluster.leader(timeout_s=30.0)
    assert cluster.write("after-restart", "after-restart")
    assert_every_ack_once(cluster, [*acked, "after-restart"])


def test_sigstop_leader_for_5s_another_leader_serves_and_old_one_steps_down(
    cluster: Cluster,
) -> None:
    with Loader(cluster) as load:
        load.wait_acks(20)
        old = cluster.leader()
        old.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        others = [m for m in cluster.members if m is not old]
        new = cluster.leader(among=others, timeout_s=10.0)
        reply = new.request(
            {
                "op": "propose",
                "rid": "during-stop",
                "key": "log",
                "value": "during-stop",
                "timeout_s": 3.0,
            }
        )
        assert reply["ok"], reply
        load.acked.append("during-stop")
        # The scenario is a 5 s freeze; the wait itself asserts nothing.
        time.sleep(max(0.0, 5.0 - (time.monotonic() - stopped_at)))
        old.signal(signal.SIGCONT)
        wait_until(
            lambda: (
                (st := old.status())
                and not st["is_leader"]
                and st["leader"] not in (None, old.addr)
            ),
            15.0,
            "old leader to step down",
        )
        n = len(load.acked)
        load.wait_acks(n + 10)
    assert_every_ack_once(cluster, load.acked)


def test_sigstop_two_of_three_proposals_fail_fast_never_hang(cluster: Cluster) -> None:
    leader = cluster.leader()
    assert cluster.write("before", "before")
    followers = [m for m in cluster.members if m is not leader]

    # The leader loses both followers: its proposal cannot commit.
    for m in followers:
        m.signal(signal.SIGSTOP)
    # The proposal fails by its own timeout (3 s) rather than hanging; the
    # request's deadline only catches a hang.
    reply = leader.request(
        {"op": "propose", "rid": "lonely", "key": "log", "value": "x", "timeout_s": 3.0},
        timeout_s=60.0,
    )
    assert not reply["ok"] and reply["error"] in ("NoQuorum", "NotLeader"), reply
    if reply["error"] == "NoQuorum":
        assert "1 of 3 masters reachable" in reply["message"]
    for m in followers:
        m.signal(signal.SIGCONT)

    # A follower cut off from the leader and the other follower.
    leader = cluster.leader()
    lone = next(m for m in cluster.members if m is not leader)
    frozen = [m for m in cluster.members if m is not lone]
    for m in frozen:
        m.signal(signal.SIGSTOP)
    reply = lone.request(
        {"op": "propose", "rid": "lone-follower", "key": "log", "value": "y", "timeout_s": 3.0},
        timeout_s=60.0,
    )
    assert not reply["ok"] and reply["error"] in ("NoQuorum", "NotLeader"), reply
    for m in frozen:
        m.signal(signal.SIGCONT)
    cluster.leader()
    assert cluster.write("after", "after")
