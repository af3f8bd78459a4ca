"""Typed exceptions of the SDK: one class per error code the cluster answers.

Every one is an `RpcError` (leptond.wire.errors) with its `code`, one-line
`message` and `extra` fields, so code that catches RpcError (leptonctl)
keeps working, and SDK users can catch what they mean:

    try:
        job = client.submit(["python", "train.py"], gpus=8)
    except Unschedulable as exc:
        print(exc.message)
"""

from __future__ import annotations

from leptond.wire.errors import RpcError


class LeptonError(RpcError):
    """Any error the cluster (or the way to it) answered."""


class BadRequest(LeptonError):
    """The call or the job spec was wrong; the message says what."""


class NotFound(LeptonError):
    """No such job, node, token or array index."""


class Forbidden(LeptonError):
    """The token may not do this (another user's job, an admin call)."""


class Conflict(LeptonError):
    """The call does not fit the state (a job already ended, a node down)."""


class Unschedulable(LeptonError):
    """No node the cluster knows could ever run this job."""


class PendingLimit(LeptonError):
    """The user has as many jobs waiting as the cluster allows."""


class NotStarted(LeptonError):
    """The task has not started, so it has no output yet (`job_state` in extra)."""


class Unavailable(LeptonError):
    """The cluster, a leader or the task's host cannot be reached now; retry later."""


class Timeout(LeptonError):
    """The call took longer than its timeout."""


class Unauthenticated(LeptonError):
    """The cluster refused the token."""


BY_CODE: dict[str, type[LeptonError]] = {
    "bad_request": BadRequest,
    "not_found": NotFound,
    "forbidden": Forbidden,
    "conflict": Conflict,
    "unschedulable": Unschedulable,
    "pending_limit": PendingLimit,
    "not_started": NotStarted,
    "unavailable": Unavailable,
    "no_quorum": Unavailable,
    "not_leader": Unavailable,
    "timeout": Timeout,
    "unauthenticated": Unauthenticated,
}


def typed(exc: RpcError) -> LeptonError:
    """The typed exception for an error reply (LeptonError for unknown codes)."""
    if isinstance(exc, LeptonError):
        return exc
    cls = BY_CODE.get(exc.code, LeptonError)
    return cls(exc.code, exc.message, **exc.extra)
