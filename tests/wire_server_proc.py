"""A live RPC server for the wire tests and bench/rpc.py.

Runs `RpcServer` on uvloop on 127.0.0.1 with one pre-shared key under the key id
"cluster", read from --psk-file or the LEPTON_TEST_PSK environment variable
(hex). Prints the port on the first line of stdout, logs to stderr.

Handlers:
  echo(x)                -> x
  stream({"n", "size", "zeros"}) -> yields n items (ints, or `size` bytes each)
  stream({"sizes": [...]})       -> yields random bytes of each size in turn
  sink(blob)             -> len(blob)
  blob(n)                -> n random bytes (a small request, a large reply)
  stats()                -> {"server": server.stats(), "rss": bytes}
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from leptond.wire import Connection, RpcServer
from leptond.wire.loop import run

KEY_ID = "cluster"


async def echo(conn: Connection, args: Any) -> Any:
    return args


async def stream(conn: Connection, args: Any) -> AsyncIterator[Any]:
    if isinstance(args, dict) and isinstance(args.get("sizes"), list):
        # Random (incompressible) items of the given sizes, without awaiting
        # between them: small ones travel batched, big ones in frames of their own.
        for size in args["sizes"]:
            yield os.urandom(int(size))
        return
    n = int(args.get("n", 0)) if isinstance(args, dict) else int(args or 0)
    size = int(args.get("size", 0)) if isinstance(args, dict) else 0
    zeros = isinstance(args, dict) and bool(args.get("zeros"))
    blob = (bytes(size) if zeros else os.urandom(size)) if size else b""
    for k in range(n):
        yield blob if size else k


async def sink(conn: Connection, args: Any) -> int:
    return len(args) if isinstance(args, bytes | str | list | dict) else 0


async def blob(conn: Connection, args: Any) -> bytes:
    n = int(args) if isinstance(args, int) else 0
    return os.urandom(n)


def read_psk(path: str | None) -> bytes:
    text = Path(path).read_text() if path else os.environ.get("LEPTON_TEST_PSK", "")
    psk = bytes.fromhex(text.strip())
    if len(psk) < 16:
        raise SystemExit(
            "need a pre-shared key of at least 16 bytes (hex) in --psk-file or LEPTON_TEST_PSK"
        )
    return psk


async def serve(args: argparse.Namespace) -> None:
    psk = read_psk(args.psk_file)
    proc = psutil.Process()
    server: RpcServer

    async def stats(conn: Connection, _: Any) -> dict[str, Any]:
        return {"server": server.stats(), "rss": proc.memory_info().rss}

    server = RpcServer(
        {"echo": echo, "stream": stream, "sink": sink, "blob": blob, "stats": stats},
        lambda key_id: psk if key_id == KEY_ID else None,
        max_connections=args.max_connections,
        handshake_timeout_s=args.handshake_timeout_s,
        idle_timeout_s=args.idle_timeout_s,
        sealed=not args.plain,
        max_buffered_bytes=args.max_buffered_bytes,
        frame_timeout_s=args.frame_timeout_s,
        max_pending_output=args.max_pending_output,
    )
    port = await server.start("127.0.0.1", args.port)
    print(port, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--psk-file")
    p.add_argument("--max-connections", type=int, default=4096)
    p.add_argument("--handshake-timeout-s", type=float, default=5.0)
    p.add_argument("--idle-timeout-s", type=float, default=120.0)
    p.add_argument("--max-buffered-bytes", type=int, default=256 * 1024 * 1024)
    p.add_argument("--frame-timeout-s", type=float, default=60.0)
    p.add_argument("--max-pending-output", type=int, default=64 * 1024 * 1024)
    p.add_argument("--plain", action="store_true", help="no sealing (benchmark baseline)")
    args = p.parse_args()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    run(serve(args))


if __name__ == "__main__":
    main()
