"""One token's stalled large frames against a real RpcServer on 127.0.0.1.

Before each key had a share of the server's buffer budget, a read token's
connections could each announce a 16 MiB frame, send one byte, and hold the
whole budget until their frame timeout: every other user's large frame (a
workdir upload) waited that long, and longer if they announced again.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop

from leptond.wire import Connection, RpcServer, open_connection
from leptond.wire.codec import MAX_FRAME

MiB = 1024 * 1024
KEYS = {"mallory": b"m" * 32, "alice": b"a" * 32, "bob": b"b" * 32}


async def sink(conn: Connection, args: Any) -> int:
    return len(args)


def test_one_keys_stalled_frames_leave_the_budget_to_other_users() -> None:
    uvloop.run(asyncio.wait_for(_stalled(), 120))


async def _stalled() -> None:
    # Room for four of the largest frames; the stalls would never time out here.
    server = RpcServer(
        {"sink": sink}, KEYS.get, max_buffered_bytes=4 * MAX_FRAME, frame_timeout_s=600
    )
    port = await server.start("127.0.0.1", 0)
    conns: list[Connection] = []
    try:
        for _ in range(8):
            c = await open_connection("127.0.0.1", port, key_id="mallory", psk=KEYS["mallory"])
            conns.append(c)
            # The length of a 16 MiB frame, then one byte of it, and nothing more.
            c._write_raw((MAX_FRAME - 64).to_bytes(4, "big") + b"x")
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        # Every frame seen: reserved, or waiting for a reservation.
        while server.budget.used // (MAX_FRAME - 64) + server.budget.waiting < 8:
            assert loop.time() < end, f"mallory's frames not seen: {server.stats()}"
            await asyncio.sleep(0.02)
        # Two other users upload big frames meanwhile, and are answered.
        others = [
            await open_connection("127.0.0.1", port, key_id=k, psk=KEYS[k])
            for k in ("alice", "bob")
        ]
        conns += others
        sizes = [3 * MiB, MAX_FRAME // 2]
        got = await asyncio.gather(
            *(c.call("sink", b"\x00" * n, timeout_s=30) for c, n in zip(others, sizes, strict=True))
        )
        assert got == sizes
        # Mallory held one frame's reservation; the rest waited behind her share.
        assert server.budget.used == MAX_FRAME - 64, server.stats()
        assert server.budget.waiting == 7, server.stats()
    finally:
        for c in conns:
            c.abort()
        await server.close()
