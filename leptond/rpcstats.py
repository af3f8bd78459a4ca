"""Counts of RPC requests and their errors by method, for /metrics.

`RpcStats.wrap` puts a counter around every handler of the RPC table (the
people's API, the agents', the masters'): a call is counted when it arrives
and, if it ends in an error, by the error's code. Methods come from the
table, codes from the RpcError codes, so the label sets stay small whatever
a client sends; an unknown method is answered by the connection before any
handler and is not counted here.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

from .wire.connection import Connection, Handler
from .wire.errors import INTERNAL, RpcError


class RpcStats:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()

    def wrap(self, handlers: Mapping[str, Handler]) -> dict[str, Handler]:
        return {name: self._counted(name, h) for name, h in handlers.items()}

    def _counted(self, name: str, handler: Handler) -> Handler:
        """The handler with its calls and errors counted, of the same kind: a
        coroutine function stays one, and so does an async generator function
        or a plain function, so the connection serves it as it would serve
        the handler itself (a plain function inline, see wire.connection)."""
        fn: Any = handler
        if inspect.iscoroutinefunction(fn):

            async def call_async(conn: Connection, args: Any) -> Any:
                self.requests[name] += 1
                try:
                    return await fn(conn, args)
                except Exception as exc:
                    self._failed(name, exc)
                    raise

            return call_async
        if inspect.isasyncgenfunction(fn):

            async def call_stream(conn: Connection, args: Any) -> AsyncIterator[Any]:
                self.requests[name] += 1
                try:
                    async for item in fn(conn, args):
                        yield item
                except Exception as exc:
                    self._failed(name, exc)
                    raise

            return call_stream

        def call(conn: Connection, args: Any) -> Any:
            self.requests[name] += 1
            try:
                out = fn(conn, args)
            except Exception as exc:
                self._failed(name, exc)
                raise
            if type(out) is dict:
                return out  # a plain function's answer
            if inspect.isasyncgen(out):
                return self._stream(name, out)
            if inspect.isawaitable(out):
                return self._await(name, out)
            return out

        return call

    async def _await(self, name: str, out: Awaitable[Any]) -> Any:
        try:
            return await out
        except Exception as exc:
            self._failed(name, exc)
            raise

    async def _stream(self, name: str, gen: AsyncIterator[Any]) -> AsyncIterator[Any]:
        try:
            async for item in gen:
                yield item
        except Exception as exc:
            self._failed(name, exc)
            raise

    def _failed(self, name: str, exc: Exception) -> None:
        """Count an error of `name` by its code (INTERNAL: not an RpcError)."""
        self.errors[name, exc.code if isinstance(exc, RpcError) else INTERNAL] += 1

    def failures(self, code: str) -> int:
        """Errors with this code, every method together."""
        return sum(n for (_, c), n in list(self.errors.items()) if c == code)
