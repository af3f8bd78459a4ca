"""The Python SDK: `from leptond.client import Client`.

`Client` (blocking) and `AsyncClient` (asyncio) read the same configuration
as leptonctl (LEPTON_ADDR, LEPTON_TOKEN, the config file), return typed
dataclasses (JobInfo, TaskInfo, NodeInfo) and raise typed exceptions
(errors.py). leptonctl makes every call through this package (calls.py).
"""

from .aio import AsyncClient, AsyncJob
from .config import ConfigError
from .errors import (
    BadRequest,
    Conflict,
    Forbidden,
    LeptonError,
    NotFound,
    NotStarted,
    PendingLimit,
    Timeout,
    Unauthenticated,
    Unavailable,
    Unschedulable,
)
from .sync import Client, Job
from .types import JobInfo, NodeInfo, SubmitOptions, TaskInfo

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "BadRequest",
    "Client",
    "ConfigError",
    "Conflict",
    "Forbidden",
    "Job",
    "JobInfo",
    "LeptonError",
    "NodeInfo",
    "NotFound",
    "NotStarted",
    "PendingLimit",
    "SubmitOptions",
    "TaskInfo",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "Unschedulable",
]
