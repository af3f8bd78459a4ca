"""Two ClusterState replicas fed the same random command log stay byte-equal,
and the invariants of DESIGN §4 and §7 hold after every command.

The log mixes well-formed commands (nodes joining, coming back with more or
less hardware, draining with and without a deadline, going down and being
removed; jobs and gangs submitted, placed by plans that are sometimes
wrong, reporting events from the right and from stale attempts, cancelled and
preempted) with replayed request ids and garbage.
"""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from raft.commands import COMMAND_VERSION, encode
from raft.model import LIVE_TASK_STATES
from raft.state import OPS, ClusterState
from tests.test_state_support import (
    GiB,
    check_invariants,
    indexes,
    is_error,
    node_record,
    records,
)

NODES = ["n0", "n1", "n2", "n3"]
USERS = ["alice", "bob"]
ARG_KEYS = [
    "node", "node_id", "state", "now", "jobs", "job_id", "user", "admin", "events",
    "placements", "preemptions", "before", "id", "role", "sealed", "name", "force",
    "deadline", "leave", "reason", "unhealthy", "healthy", "usage_before",
]  # fmt: skip

junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=3)
    | st.binary(max_size=3),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


class ReplicatedClusterState(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.a = ClusterState()
        self.b = ClusterState()
        self.index = 0
        self.now = 1_000.0
        self.next_job = 0
        self.resources: dict[str, dict[str, Any]] = {}
        self.first_result: dict[bytes, Any] = {}
        self.sent: list[tuple[str, dict[str, Any]]] = []  # well-formed (op, args) so far

    # -- feeding both replicas ------------------------------------------------------------
    def apply_bytes(self, data: bytes, well_formed: bool = True) -> Any:
        self.index += 1
        before = records(self.a)
        ra = self.a.apply(data, self.index)
        rb = self.b.apply(data, self.index)
        assert ra == rb
        assert self.a.snapshot() == self.b.snapshot()
        assert not is_error(ra, "internal"), ra
        if is_error(ra):
            assert records(self.a) == before, f"{ra} but the state changed"
        if well_formed:
            assert not is_error(ra, "bad_command"), ra
            self.first_result.setdefault(data, ra)
        return ra

    def apply(self, op: str, args: dict[str, Any]) -> Any:
        self.now += 1.0
        args = {"now": self.now, **args}
        self.sent.append((op, args))
        return self.apply_bytes(encode(op, args, f"r{self.index}"))

    def live_tasks(self) -> list[str]:
        return [t.id for t in self.a.tasks.values() if t.state in LIVE_TASK_STATES]

    @initialize()
    def a_few_nodes(self) -> None:
        for node in ("n0", "n1", "n2"):
            self.register_node(node, 4, 8.0, 32 * GiB)

    # -- nodes --------------------------------------------------------------------------------
    def register_node(self, node: str, gpus: int, cpus: float, mem: int, same: bool = True) -> None:
        # A known host mostly comes back with the hardware it had, now and then
        # with more or less (a GPU fell off the bus); a new one brings its own.
        if node not in self.a.nodes or not same:
            self.resources[node] = {"gpus": gpus, "cpus": cpus, "mem_bytes": mem}
        known = self.a.nodes.get(node)
        drain = None if known is None else (known.drain_reason, known.drain_deadline)
        self.apply("register_node", {"node": node_record(node, **self.resources[node])})
        if drain is not None:
            # A drain outlives the node going down and coming back.
            n = self.a.nodes[node]
            assert (n.drain_reason, n.drain_deadline) == drain, n
            assert n.state == ("ready" if drain[0] is None else "draining"), n

    @rule(
        change=st.sampled_from(
            [
                *["register"] * 4,
                *("reshape", "ready", "drain", "deadline", "leave", "down", "remove"),
            ]
        ),
        node=st.sampled_from(NODES),
        gpus=st.integers(0, 4),
        cpus=st.sampled_from([2.0, 4.0, 8.0]),
        mem=st.sampled_from([8 * GiB, 32 * GiB]),
        force=st.booleans(),
    )
    def node_changes(
        self, change: str, node: str, gpus: int, cpus: float, mem: int, force: bool
    ) -> None:
        if change in ("register", "reshape"):
            self.register_node(node, gpus, cpus, mem, same=change == "register")
        elif change in ("drain", "ready"):
            state = "draining" if change == "drain" else "ready"
            self.apply("node_state", {"node_id": node, "state": state})
        elif change == "deadline":
            deadline = self.now + gpus  # sometimes already due
            self.apply("node_state", {"node_id": node, "state": "draining", "deadline": deadline})
        elif change in ("leave", "down"):
            known = self.a.nodes.get(node)
            drain = None if known is None else (known.drain_reason, known.drain_deadline)
            if change == "down":
                self.apply("node_down", {"node_id": node})
            else:
                leave = {"node_id": node, "state": "draining", "reason": "leaving", "leave": True}
                self.apply("node_state", leave)
            if drain is not None and (change == "down" or drain[0] is not None):
                # Neither going down nor an agent's leave touches a drain that holds.
                n = self.a.nodes[node]
                assert (n.drain_reason, n.drain_deadline) == drain, n
        else:
            self.apply("remove_node", {"node_id": node, "force": force})

    # -- jobs ---------------------------------------------------------------------------------
    @rule(
        nodes=st.sampled_from([1, 1, 2, 3]),
        gpus=st.integers(0, 3),
        cpus=st.sampled_from([0.5, 1.0, 3.0]),
        mem=st.sampled_from([0, GiB, 16 * GiB]),
        retries=st.integers(0, 2),
        preemptible=st.booleans(),
        user=st.sampled_from(USERS),
        invalid=st.integers(0, 9),
    )
    def submit(
        self,
        nodes: int,
        gpus: int,
        cpus: float,
        mem: int,
        retries: int,
        preemptible: bool,
        user: str,
        invalid: int,
    ) -> None:
        self.next_job += 1
        spec: dict[str, Any] = {
            "argv": ["train"],
            "nodes": nodes,
            "gpus": gpus,
            "cpus": cpus,
            "mem_bytes": mem,
            "retries": retries,
            "preemptible": preemptible,
        }
        if invalid == 0:
            spec["gpus"] = -1
        job = {"id": f"j{self.next_job}", "user": user, "spec": spec, "submitted_at": self.now}
        [result] = self.apply("submit_jobs", {"jobs": [job]})["results"]
        assert is_error(result, "bad_request") == (invalid == 0)

    @precondition(lambda self: self.a.jobs)
    @rule(data=st.data(), admin=st.booleans(), user=st.sampled_from(USERS))
    def cancel(self, data: st.DataObject, admin: bool, user: str) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.a.jobs)))
        job = self.a.jobs[job_id]
        result = self.apply("cancel_job", {"job_id": job_id, "user": user, "admin": admin})
        if not (admin or user == job.user):
            assert is_error(result, "forbidden")

    # -- scheduling -----------------------------------------------------------------------------
    def free_gpus(self) -> dict[str, list[int]]:
        out = {}
        for node_id, node in self.a.nodes.items():
            held, _, _ = self.a.node_usage(node_id)
            out[node_id] = [g["index"] for g in node.gpus if g["index"] not in held]
        return out

    @precondition(lambda self: self.a.pending)
    @rule(data=st.data())
    def plan(self, data: st.DataObject) -> None:
        """Place some pending jobs; mostly sensible, sometimes wrong in some way."""
        free = self.free_gpus()
        waiting = sorted({self.a.tasks[tid].job_id for tid in self.a.pending})
        jobs = waiting
        if data.draw(st.integers(0, 3)) == 0:
            jobs = data.draw(st.lists(st.sampled_from(waiting), min_size=1, unique=True))
        placements: list[dict[str, Any]] = []
        for job_id in jobs:
            job = self.a.jobs[job_id]
            want = job.spec["gpus"]
            used: set[str] = set()
            for tid in job.tasks:
                if data.draw(st.integers(0, 19)) == 0:
                    continue  # an incomplete gang
                fits = [
                    n
                    for n, node in self.a.nodes.items()
                    if node.state == "ready" and len(free[n]) >= want and n not in used
                ]
                if fits and data.draw(st.integers(0, 4)):
                    node_id = data.draw(st.sampled_from(sorted(fits)))
                    gpus = free[node_id][:want]
                else:
                    node_id = data.draw(st.sampled_from([*NODES, "nowhere"]))
                    gpus = data.draw(st.lists(st.integers(0, 4), min_size=0, max_size=4))
                used.add(node_id)
                free[node_id] = [g for g in free.get(node_id, []) if g not in gpus]
                placements.append({"task_id": tid, "node_id": node_id, "gpus": gpus})
        if data.draw(st.integers(0, 9)) == 0:
            placements.append({"task_id": "j0.0", "node_id": "n0", "gpus": []})
        if placements and data.draw(st.integers(0, 9)) == 0:
            placements.append(dict(data.draw(st.sampled_from(placements))))
        preemptions = []
        live = self.live_tasks()
        if live and data.draw(st.integers(0, 3)) == 0:
            preemptions.append({"task_id": data.draw(st.sampled_from(live)), "for_task": "x"})
        result = self.apply("plan", {"placements": placements, "preemptions": preemptions})
        for tid in result["placed"]:
            assert self.a.tasks[tid].state == "assigned"
        if result["placed"] and data.draw(st.booleans()):
            # The agents start what they were given.
            events = [
                {"task_id": t, "attempt": self.a.tasks[t].attempt, "state": "running", "at": 0.0}
                for t in result["placed"]
            ]
            assert self.apply("task_events", {"events": events})["applied"] == len(events)

    @precondition(lambda self: any(n.drain_deadline is not None for n in self.a.nodes.values()))
    @rule(data=st.data())
    def drain_deadline_passes(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(sorted(self.a.nodes)))
        deadline = self.a.nodes[node].drain_deadline
        down = self.a.nodes[node].state == "down"  # its drain waits for it to come back
        result = self.apply("drain_expired", {"node_id": node})
        if deadline is None or deadline > self.now or down:
            assert is_error(result, "conflict"), result
        else:
            for tid in result["stopping"]:
                t = self.a.tasks[tid]
                # A running task keeps the stop until its exit comes back; one
                # only assigned ends at once, back to pending with no stop
                # (DESIGN §6: an ended task never carries a stop).
                assert t.stop == "drain" or (
                    t.state == "pending" and t.stop is None and "before it started" in t.message
                ), t

    @precondition(lambda self: self.live_tasks())
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self.live_tasks()))
        self.apply("plan", {"preemptions": [{"task_id": task_id, "for_task": "x"}]})

    @precondition(lambda self: self.a.nodes)
    @rule(data=st.data(), heal=st.booleans())
    def gpu_health(self, data: st.DataObject, heal: bool) -> None:
        """An agent finds a GPU faulty (sometimes one the node lacks), or a reset heals one."""
        node = data.draw(st.sampled_from(sorted(self.a.nodes)))
        idx = data.draw(st.integers(0, 4))
        if heal:
            self.apply("gpu_health", {"node_id": node, "healthy": [idx]})
            assert idx not in {f["index"] for f in self.a.nodes[node].gpu_faults}
            return
        has = idx in {g["index"] for g in self.a.nodes[node].gpus}
        result = self.apply(
            "gpu_health", {"node_id": node, "unhealthy": [{"index": idx, "reason": "Xid 79"}]}
        )
        assert is_error(result, "bad_request") == (not has), result
        for tid in [] if not has else result["stopping"]:
            t = self.a.tasks[tid]
            assert idx in t.gpus or t.state == "pending", t

    @precondition(lambda self: self.a.tasks)
    @rule(data=st.data())
    def task_events(self, data: st.DataObject) -> None:
        live = self.live_tasks()
        events = []
        for _ in range(data.draw(st.integers(1, 4))):
            pool = live if live and data.draw(st.integers(0, 4)) else sorted(self.a.tasks)
            t = self.a.tasks[data.draw(st.sampled_from(pool))]
            ev: dict[str, Any] = {
                "task_id": t.id,
                "attempt": t.attempt + data.draw(st.sampled_from([0, 0, 0, 0, -1, 1])),
                "state": data.draw(st.sampled_from(["running", "exited", "exited", "bogus"])),
                "exit_code": data.draw(st.sampled_from([0, 0, 1, 137, None])),
                "at": self.now,
            }
            if data.draw(st.integers(0, 4)):
                ev["node_id"] = t.node_id
            elif data.draw(st.booleans()):
                ev["node_id"] = data.draw(st.sampled_from(NODES))
            events.append(ev)
        result = self.apply("task_events", {"events": events})
        assert result["applied"] + result["stale"] <= len(events)

    # -- the command boundary ---------------------------------------------------------------------
    @rule(data=st.data(), kind=st.sampled_from(["bytes", "args", "corrupted", "corrupted"]))
    def garbage(self, data: st.DataObject, kind: str) -> None:
        if kind == "bytes":
            result = self.apply_bytes(data.draw(st.binary(max_size=24)), well_formed=False)
            assert is_error(result)
        elif kind == "args" or not self.sent:
            op = data.draw(st.sampled_from([*sorted(OPS - {"noop"}), "nope"]))
            v = data.draw(st.sampled_from([COMMAND_VERSION, COMMAND_VERSION + 1, 0]))
            args = data.draw(st.dictionaries(st.sampled_from(ARG_KEYS), junk, max_size=4))
            command = {"op": op, "v": v, "rid": f"g{self.index}", "args": args}
            self.apply_bytes(msgpack.packb(command, use_bin_type=True), well_formed=False)
        else:
            self.apply_bytes(self.corrupted(data), well_formed=False)

    def corrupted(self, data: st.DataObject) -> bytes:
        """A command seen before with one value, anywhere inside, replaced or removed."""
        sent = self.sent[-20:] or [("noop", {"x": 1})]
        op, args = data.draw(st.sampled_from(sent))
        args = msgpack.unpackb(msgpack.packb(args, use_bin_type=True), raw=False)
        path = data.draw(st.sampled_from(list(_paths(args))))
        parent = args
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and data.draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(junk)
        return encode(op, args, f"c{self.index}")

    @rule(data=st.data(), chore=st.sampled_from(["gc", "replay", "replay", "restore"]))
    def housekeeping(self, data: st.DataObject, chore: str) -> None:
        if chore == "gc":
            before = self.now - data.draw(st.integers(0, 30))
            usage_before = data.draw(st.sampled_from([None, before, before + 86400 * 2]))
            self.apply("gc_jobs", {"before": before, "usage_before": usage_before})
        elif chore == "replay":
            # A client retrying after a lost answer gets the first answer, applied once.
            command = data.draw(st.sampled_from(sorted(self.first_result)))
            assert self.apply_bytes(command) == self.first_result[command]
        elif data.draw(st.booleans()):
            # A follower that installs the leader's snapshot is the same replica.
            self.b = ClusterState()
            self.b.restore(self.a.snapshot())
            assert self.b.snapshot() == self.a.snapshot()
        else:
            self.apply("restore", {"state": self.a.snapshot()})

    # -- after every step ------------------------------------------------------------------------
    @invariant()
    def replicas_agree_and_invariants_hold(self) -> None:
        assert indexes(self.a) == indexes(self.b)
        check_invariants(self.a)


ReplicatedClusterState.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestReplicatedClusterState = ReplicatedClusterState.TestCase


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Any:
    """Every (key, index, ...) path to a value inside nested maps and lists."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for key, value in items:
        yield (*prefix, key)
        if isinstance(value, dict | list):
            yield from _paths(value, (*prefix, key))
