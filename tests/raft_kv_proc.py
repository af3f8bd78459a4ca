"""A RaftNode with a tiny KV state machine, for process-level Raft tests.

Run as a program, it serves a line-based JSON control interface on
127.0.0.1 (one request per line, one reply per line)::

    {"op": "propose", "rid": "...", "key": "k", "value": "v", "kind": "append"}
    {"op": "status"} | {"op": "dump"} | {"op": "add_member", "addr": "..."}

Imported, it offers ``KVStateMachine`` and the test-side ``Cluster`` harness.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from raft.errors import NoQuorum, NotLeader, ProposeTimeout, RaftError  # noqa: E402

SEEN_LIMIT = 100_000


def kv_command(rid: str, key: str, value: str, kind: str = "append") -> bytes:
    return msgpack.packb({"rid": rid, "kind": kind, "key": key, "value": value})


class Encoded:
    """An already encoded state, as RaftNode's StateMachine.freeze returns it."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def encode_chunks(self) -> list[bytes]:
        return [self.data]


class KVStateMachine:
    """Deterministic KV store; dedupes by request id like ClusterState must."""

    def __init__(self) -> None:
        self.kv: dict[str, str] = {}
        self.lists: dict[str, list[str]] = {}
        self.seen: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.last_index = 0

    def apply(self, command: bytes, index: int) -> Any:
        self.last_index = index
        try:
            cmd = msgpack.unpackb(command)
            rid, kind, key, value = cmd["rid"], cmd["kind"], cmd["key"], cmd["value"]
        except Exception:
            return {"error": {"code": "bad_command", "message": "undecodable command"}}
        if rid in self.seen:
            return self.seen[rid]
        if kind == "put":
            self.kv[key] = value
            result: Any = {"index": index}
        elif kind == "append":
            self.lists.setdefault(key, []).append(value)
            result = {"index": index, "len": len(self.lists[key])}
        elif kind == "boom":
            raise RuntimeError("boom requested")  # proves the shell survives
        else:
            result = {"error": {"code": "bad_kind", "message": kind}}
        self.seen[rid] = result
        while len(self.seen) > SEEN_LIMIT:
            self.seen.popitem(last=False)
        return result

    def snapshot(self) -> bytes:
        return msgpack.packb(
            {
                "kv": self.kv,
                "lists": self.lists,
                "seen": list(self.seen.items()),
                "last_index": self.last_index,
            }
        )

    def freeze(self, for_snapshot: bool = False) -> Encoded:
        # A small state: encoded at once, on the Raft thread.
        return Encoded(self.snapshot())

    def restore(self, data: bytes) -> None:
        d = msgpack.unpackb(data)
        self.kv, self.lists = d["kv"], d["lists"]
        self.seen = collections.OrderedDict((k, v) for k, v in d["seen"])
        self.last_index = d["last_index"]


# --------------------------------------------------------------------------
# The program


async def _serve(args: argparse.Namespace) -> None:
    from raft.node import RaftNode

    state = KVStateMachine()
    node = RaftNode(
        state,
        args.addr,
        args.peers.split(","),
        Path(args.data_dir),
        bytes.fromhex(args.secret),
        raft_min_timeout_s=args.min_timeout,
        raft_max_timeout_s=args.max_timeout,
        connection_retry_s=0.3,
        log_compaction_min_entries=args.compact_entries,
    )
    synced_file = Path(args.data_dir) / "synced_size"

    def record_synced(size: int) -> None:
        # Not fsynced: this file only has to survive kill -9, not power loss.
        tmp = synced_file.with_suffix(".tmp")
        tmp.write_text(str(size))
        os.replace(tmp, synced_file)

    node.journal.on_synced = record_synced
    record_synced(node.journal.synced_size)

    async def handle(req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        if op == "propose":
            cmd = kv_command(req["rid"], req["key"], req["value"], req.get("kind", "append"))
            try:
                res = await node.propose(cmd, timeout_s=req.get("timeout_s", 3.0))
                return {"ok": True, "result": res}
            except NotLeader as e:
                return {"ok": False, "error": "NotLeader", "leader": e.leader}
            except NoQuorum as e:
                return {"ok": False, "error": "NoQuorum", "message": str(e)}
            except ProposeTimeout as e:
                return {"ok": False, "error": "ProposeTimeout", "message": str(e)}
        if op == "status":
            return {"ok": True, "status": node.status()}
        if op == "dump":
            with node.lock:
                return {
                    "ok": True,
                    "lists": state.lists,
                    "kv": state.kv,
                    "last_index": state.last_index,
                }
        if op in ("add_member", "remove_member"):
            fn = node.add_member if op == "add_member" else node.remove_member
            try:
                await fn(req["addr"], timeout_s=req.get("timeout_s", 5.0))
                return {"ok": True}
            except NotLeader as e:
                return {"ok": False, "error": "NotLeader", "leader": e.leader}
            except RaftError as e:
                return {"ok": False, "error": type(e).__name__, "message": str(e)}
        return {"ok": False, "error": "bad_op"}

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                reply = await handle(json.loads(line))
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", args.ctl_port)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--addr", required=True)
    p.add_argument("--peers", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--ctl-port", type=int, required=True)
    p.add_argument("--secret", required=True, help="hex")
    p.add_argument("--min-timeout", type=float, default=0.5)
    p.add_argument("--max-timeout", type=float, default=1.2)
    p.add_argument("--compact-entries", type=int, default=5000)
    args = p.parse_args()
    asyncio.run(_serve(args))


# --------------------------------------------------------------------------
# Test-side harness


def free_port() -> int:
    from tests.harness import free_ports  # its per-worker slice of ports

    return free_ports(1)[0]


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str, step_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(step_s)


class Member:
    def __init__(self, root: Path, secret: bytes, compact_entries: int) -> None:
        self.raft_port = free_port()
        self.ctl_port = free_port()
        self.addr = f"127.0.0.1:{self.raft_port}"
        self.data_dir = root / f"node-{self.raft_port}"
        self.log_path = root / f"node-{self.raft_port}.log"
        self.secret = secret
        self.compact_entries = compact_entries
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, peers: list[str]) -> None:
        assert self.proc is None
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--addr",
            self.addr,
            "--peers",
            ",".join(peers),
            "--data-dir",
            str(self.data_dir),
            "--ctl-port",
            str(self.ctl_port),
            "--secret",
            self.secret.hex(),
            "--compact-entries",
            str(self.compact_entries),
        ]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True
            )

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def request(self, req: dict[str, Any], timeout_s: float = 6.0) -> dict[str, Any]:
        with socket.create_connection(("127.0.0.1", self.ctl_port), timeout=timeout_s) as s:
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("control connection closed")
                buf += chunk
        reply: dict[str, Any] = json.loads(buf)
        return reply

    def try_request(self, req: dict[str, Any], timeout_s: float = 6.0) -> dict[str, Any] | None:
        try:
            return self.request(req, timeout_s)
        except (OSError, ValueError):
            return None

    def status(self) -> dict[str, Any] | None:
        r = self.try_request({"op": "status"}, 2.0)
        return r["status"] if r else None

    def truncate_to_synced(self) -> None:
        """Drop whatever the journal file holds beyond its last fsync."""
        size = int((self.data_dir / "synced_size").read_text())
        journal = self.data_dir / "raft.journal"
        if journal.stat().st_size > size:
            os.truncate(journal, size)


class Cluster:
    def __init__(
        self, root: Path, n: int, secret: bytes = b"s3cret-cluster", compact_entries: int = 5000
    ) -> None:
        self.root, self.secret, self.compact_entries = root, secret, compact_entries
        self.members = [Member(root, secret, compact_entries) for _ in range(n)]
        self.extra: list[Member] = []

    @property
    def addrs(self) -> list[str]:
        return [m.addr for m in self.members]

    def all(self) -> Iterator[Member]:
        yield from self.members
        yield from self.extra

    def start(self) -> None:
        for m in self.members:
            m.start(self.addrs)

    def stop(self) -> None:
        for m in self.all():
            m.signal(signal.SIGCONT)
            m.kill()

    def by_addr(self, addr: str) -> Member:
        return next(m for m in self.all() if m.addr == addr)

    def leader(self, among: list[Member] | None = None, timeout_s: float = 20.0) -> Member:
        """A member that says it is leader (after leadership settled)."""
        candidates = among or self.members

        def find() -> Member | None:
            for m in candidates:
                st = m.status() if m.proc is not None else None
                if st and st["is_leader"] and st["has_quorum"]:
                    return m
            return None

        found: Member = wait_until(find, timeout_s, "a leader")
        return found

    def write(
        self,
        rid: str,
        value: str,
        key: str = "log",
        deadline_s: float = 20.0,
        timeout_s: float = 3.0,
        stop: Callable[[], bool] | None = None,
    ) -> bool:
        """Propose until acknowledged, retrying the SAME request id everywhere.

        Returns False only if ``stop`` asked to give up first.
        """
        deadline = time.monotonic() + deadline_s
        target: Member | None = None
        i = 0
        req = {"op": "propose", "rid": rid, "key": key, "value": value, "timeout_s": timeout_s}
        while time.monotonic() < deadline:
            if stop is not None and stop():
                return False
            alive = [m for m in self.members if m.proc is not None]
            if not alive:
                time.sleep(0.05)
                continue
            if target is None or target.proc is None:
                target = alive[i % len(alive)]
                i += 1
            reply = target.try_request(req, timeout_s + 3.0)
            if reply is not None and reply["ok"]:
                return True
            hint = reply.get("leader") if reply else None
            target = None
            if hint:
                with contextlib.suppress(StopIteration):
                    target = self.by_addr(hint)
            if target is None or reply is None or reply["error"] != "NotLeader":
                time.sleep(0.05)
        raise AssertionError(f"write {rid} not acknowledged within {deadline_s}s")

    def dump(self, m: Member) -> dict[str, Any]:
        r = wait_until(lambda: m.try_request({"op": "dump"}), 10.0, f"dump from {m.addr}")
        return dict(r)


if __name__ == "__main__":
    main()
