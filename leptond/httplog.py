"""One short line, now and then, for malformed HTTP requests.

aiohttp logs each request it cannot parse (a header over 8 KiB, a bad
request line) at ERROR with a full traceback that quotes the request's
bytes. The HTTP ports (the masters' web UI and /metrics, the agents'
/metrics) take requests from anyone, so a stranger could fill the log at
the speed of the network. What a client got wrong is not our error: it is
logged at WARNING, without the traceback or the client's bytes, at most
once per `EVERY_S`, with a count of the ones left out. Errors in our own
handlers keep their tracebacks.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

from .wire.ratelog import Throttle

EVERY_S = 10.0


class BadRequestLines(logging.Filter):
    """Rewrites aiohttp's record of a request it could not parse, or drops it
    when one was written less than `every_s` before (by the records' own
    times: no clock to read)."""

    def __init__(self, every_s: float = EVERY_S) -> None:
        super().__init__()
        self._throttle = Throttle(every_s)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        left_out = self._throttle.admit("bad request", record.created)
        if left_out is None:
            return False
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        more = f" ({left_out} more left out)" if left_out else ""
        record.msg = "refused a malformed HTTP request from %s: %s %s%s"
        record.args = (remote, exc.code, type(exc).__name__, more)
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_bad_requests(every_s: float = EVERY_S) -> None:
    """Install the filter on aiohttp's server logger, once per process."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestLines) for f in logger.filters):
        logger.addFilter(BadRequestLines(every_s))
