"""leptond/httplog.py: aiohttp's record of a request it could not parse
becomes one WARNING line at most every period; other records pass as they
are. Records carry their own times, so these need no clock."""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import LineTooLong

from leptond.httplog import BadRequestLines


def record(at: float, exc: BaseException | None) -> logging.LogRecord:
    r = logging.LogRecord(
        "aiohttp.server",
        logging.ERROR,
        __file__,
        1,
        "Error handling request from %s",
        ("10.1.2.3",),
        (type(exc), exc, None) if exc is not None else None,
    )
    r.created = at
    return r


def bad() -> LineTooLong:
    return LineTooLong(b"a" * 100, 8190)


def test_a_malformed_request_is_one_warning_line_without_its_bytes() -> None:
    f = BadRequestLines(every_s=10.0)
    r = record(100.0, bad())
    assert f.filter(r)
    assert (r.levelname, r.exc_info) == ("WARNING", None)
    text = r.getMessage()
    assert text == "refused a malformed HTTP request from 10.1.2.3: 400 LineTooLong", text


def test_more_within_the_period_are_left_out_and_counted_in_the_next_line() -> None:
    f = BadRequestLines(every_s=10.0)
    assert f.filter(record(100.0, bad()))
    assert not any(f.filter(record(100.0 + k, bad())) for k in range(1, 10))
    later = record(110.5, bad())
    assert f.filter(later)
    assert later.getMessage().endswith("(9 more left out)"), later.getMessage()


def test_errors_of_our_own_handlers_keep_their_tracebacks() -> None:
    f = BadRequestLines(every_s=10.0)
    ours = record(100.0, KeyError("x"))
    assert f.filter(ours) and ours.levelno == logging.ERROR and ours.exc_info is not None
    plain = record(100.0, None)
    assert f.filter(plain) and plain.getMessage() == "Error handling request from 10.1.2.3"
