"""Notifications from a hostile peer against a real RpcServer on 127.0.0.1.

A notification has no reply, so before the server capped them a read token
could make the leader serve any method (a `jobs` listing) without end and
without reading a byte back, and everyone else's calls waited behind it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop

from leptond.wire import Connection, RpcServer, open_connection
from leptond.wire.connection import MAX_NOTIFY_IN_FLIGHT

PSK = b"k" * 32
FLOOD = 20_000


async def start(handlers: dict[str, Any]) -> tuple[RpcServer, int]:
    server = RpcServer(
        handlers, lambda key_id: PSK if key_id == "cluster" else None, notifications=("keys",)
    )
    return server, await server.start("127.0.0.1", 0)


async def connect(port: int) -> Connection:
    return await open_connection("127.0.0.1", port, key_id="cluster", psk=PSK)


async def wait_until(cond: Any, what: str, deadline_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not cond():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_a_method_not_declared_as_a_notification_is_never_served_as_one() -> None:
    uvloop.run(asyncio.wait_for(_undeclared(), 120))


async def _undeclared() -> None:
    served = {"jobs": 0}

    async def jobs(conn: Connection, args: Any) -> Any:
        served["jobs"] += 1
        return {"jobs": []}

    async def echo(conn: Connection, args: Any) -> Any:
        return args

    server, port = await start({"jobs": jobs, "echo": echo})
    attacker, other = await connect(port), await connect(port)
    try:
        for i in range(FLOOD):
            attacker.notify("jobs", {"limit": 1000})
            if i % 500 == 0:
                await attacker.drain()
        # A call behind the flood on the same connection: once it is
        # answered, every notification before it has been read.
        assert await attacker.call("echo", "after", timeout_s=60) == "after"
        assert await other.call("echo", "other", timeout_s=60) == "other"
        assert served["jobs"] == 0, f"{served['jobs']} undeclared notifications were served"
        # The method itself still works as a call.
        assert await other.call("jobs", {}, timeout_s=60) == {"jobs": []}
    finally:
        attacker.close()
        other.close()
        await server.close()


def test_a_flood_of_declared_notifications_is_held_to_the_cap_by_back_pressure() -> None:
    uvloop.run(asyncio.wait_for(_declared(), 120))


async def _declared() -> None:
    running = {"now": 0, "most": 0, "done": 0}
    gate = asyncio.Event()

    async def keys(conn: Connection, args: Any) -> None:
        running["now"] += 1
        running["most"] = max(running["most"], running["now"])
        try:
            await gate.wait()
        finally:
            running["now"] -= 1
            running["done"] += 1

    async def echo(conn: Connection, args: Any) -> Any:
        return args

    server, port = await start({"keys": keys, "echo": echo})
    attacker, other = await connect(port), await connect(port)
    try:
        for i in range(FLOOD):
            attacker.notify("keys", {"data": b"x"})
            if i % 500 == 0:
                # Not drain(): a server that stops reading must not stall
                # the attacker's own sending here.
                await asyncio.sleep(0)
        await wait_until(lambda: running["now"] >= MAX_NOTIFY_IN_FLIGHT, "the cap to fill")
        # Another user is answered while the attacker's handlers hang ...
        assert await other.call("echo", "other", timeout_s=60) == "other"
        # ... and the attacker never got more than the cap running at once.
        assert running["most"] == MAX_NOTIFY_IN_FLIGHT, running
        # Released, every notification is served in the end: none dropped.
        gate.set()
        await wait_until(lambda: running["done"] == FLOOD, "every notification to be served")
        assert running["most"] == MAX_NOTIFY_IN_FLIGHT, running
    finally:
        attacker.close()
        other.close()
        await server.close()
