"""Validation of job specs and names, shared by the API (clear errors before a
proposal) and by apply (which must never trust its input).

Apply validates with the limits of the command's format version (its `v`):
a release that changes a limit adds a version, so replaying an old journal
accepts and refuses exactly what it did when the entries were written.
Version 1 counted characters; version 2 counts bytes of the encoded command,
which is what bounds the size of a Raft entry.
"""

from __future__ import annotations

import re
from typing import Any

from .arrays import ArrayError, check_ranges, count
from .commands import COMMAND_VERSION, encoded_size, human_bytes, packb
from .model import JobSpec

MAX_GPUS = 1024
MAX_CPUS = 4096
MAX_MEM = 64 << 40
MAX_NODES = 1024
MAX_ARGV = 4096
# Version 1 (characters): the whole argv, and each env or constraint value.
V1_MAX_ARG_CHARS = 256 * 1024
V1_MAX_VALUE_CHARS = 64 * 1024
# Version 2 (bytes of the msgpack encoding): argv and env together, the
# whole spec, and each constraint value. A whole spec stays far below
# raft.commands.MAX_ENTRY_BYTES, so one job always fits in one entry.
MAX_COMMAND_ENV_BYTES = 256 * 1024
MAX_SPEC_BYTES = 384 * 1024
MAX_CONSTRAINTS = 256
MAX_CONSTRAINT_VALUE_BYTES = 1024
MAX_PATH_BYTES = 4096
# Version 4: job arrays and dependencies. A job waits for at most this many
# jobs; a job id is what the API makes ("j-" and 12 hex digits), with room.
WORKLOAD_FIELDS_SINCE = 4
WORKLOAD_FIELDS = (
    "array",
    "max_running",
    "after_ok",
    "after_any",
    "signal",
    "signal_before_s",
    "preempt_grace_s",
    "tty",
    "tty_size",
)
# Signals a task may ask to be warned with (--signal NAME@DURATION).
WARN_SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP", "ALRM")
MAX_SIGNAL_BEFORE_S = 7 * 86400.0
MAX_PREEMPT_GRACE_S = 86400.0
MAX_DEPENDENCIES = 64
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
# Environment names the cluster sets for every task (DESIGN §6): a job's --env
# may not set them, or a task could point itself at GPUs or a rendezvous that
# are not its own.
RESERVED_ENV = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "RANK",
        "NODE_RANK",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
    }
)
RESERVED_ENV_PREFIXES = ("LEPTON_", "PET_")
# What useradd accepts, minus the all-digit names that read as uids.
UNIX_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,31}\$?$")


class SpecError(ValueError):
    """A user mistake in a job spec; the message is one line meant for people."""


def _shown(v: Any) -> str:
    """A value as an error message quotes it: a megabyte name is not echoed back."""
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _num(spec: dict[str, Any], key: str, lo: float, hi: float, integer: bool, default: Any) -> Any:
    v = spec.get(key, default)
    if v is None:
        return default
    # The usual number, a plain int or float within the bounds (which lie
    # inside int64), passes every check below: answered at once. Anything
    # else (a bool, an int subclass, NaN, a fraction where a whole number is
    # due, out of bounds) takes the checks, which say what is wrong.
    t = type(v)
    if (t is int or (t is float and (not integer or v.is_integer()))) and lo <= v <= hi:
        return int(v) if integer else float(v)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise SpecError(f"{key} must be a number, got {_shown(v)}")
    if isinstance(v, int) and not -(2**63) <= v < 2**64:  # JSON ints can be beyond a float
        raise SpecError(f"{key} must be between {lo:g} and {hi:g}")
    if integer and (not float(v).is_integer()):
        raise SpecError(f"{key} must be a whole number, got {_shown(v)}")
    if not lo <= v <= hi:
        raise SpecError(f"{key} must be between {lo:g} and {hi:g}, got {v:g}")
    return int(v) if integer else float(v)


def _str_map(
    spec: dict[str, Any], key: str, key_re: re.Pattern[str], what: str, max_chars: int | None
) -> dict[str, str]:
    v = spec.get(key) or {}
    if not isinstance(v, dict):
        raise SpecError(f"{key} must be a map of {what}")
    out: dict[str, str] = {}
    for k, val in v.items():
        if not isinstance(k, str) or not key_re.match(k):
            raise SpecError(f"{key}: {_shown(k)} is not a valid {what} name")
        too_long = max_chars is not None and isinstance(val, str) and len(val) > max_chars
        if not isinstance(val, str) or too_long or "\x00" in val:
            raise SpecError(f"{key}: value of {k} must be a string")
        out[k] = val
    return out


def _env(spec: dict[str, Any], v1: bool) -> dict[str, str]:
    env = _str_map(
        spec, "env", ENV_NAME, "environment variable", V1_MAX_VALUE_CHARS if v1 else None
    )
    if v1:
        return env  # version 1 had no reserved names: old journals replay as they applied
    for k in env:
        if k in RESERVED_ENV or k.startswith(RESERVED_ENV_PREFIXES):
            raise SpecError(f"--env may not set {k}: the cluster sets it for every task")
    return env


def _encoded_size(value: Any, what: str) -> int:
    try:
        return len(packb(value))
    except (UnicodeEncodeError, ValueError, TypeError, OverflowError):
        # A lone surrogate from JSON, say: it could not be stored anyway.
        raise SpecError(f"{what} cannot be encoded: text must be valid UTF-8") from None


def _check_sizes_v2(out: JobSpec) -> dict[str, Any]:
    """Version 2 limits, in bytes of the encoded command; returns the stored
    spec it measured (stored_spec(out)), which apply keeps."""
    stored = stored_spec(out)
    whole: int | None = None  # None: the checks below say which part cannot be encoded
    try:
        whole = len(packb(stored))
    except (UnicodeEncodeError, ValueError, TypeError, OverflowError):
        pass
    # The usual spec is far smaller than the smallest limit on a part of
    # it, and every part (argv and env together, a constraint value, a
    # path) packs within the whole: each check below would pass, so they
    # are not run (each encodes its part again). The constraints' count and
    # gpu_type's bytes are no encoded size: checked as below.
    if (
        whole is not None
        and whole <= MAX_CONSTRAINT_VALUE_BYTES
        and len(out.constraints) <= MAX_CONSTRAINTS
        and (out.gpu_type is None or len(out.gpu_type.encode("utf-8", "replace")) <= 64)
    ):
        return stored
    size = _encoded_size(out.argv, "command") + _encoded_size(out.env, "env")
    if size > MAX_COMMAND_ENV_BYTES:
        raise SpecError(
            f"command and env are {human_bytes(size)}; the limit is "
            f"{human_bytes(MAX_COMMAND_ENV_BYTES)}"
        )
    if len(out.constraints) > MAX_CONSTRAINTS:
        raise SpecError(f"at most {MAX_CONSTRAINTS} constraints, got {len(out.constraints)}")
    for k, val in out.constraints.items():
        if _encoded_size(val, "constraints") > MAX_CONSTRAINT_VALUE_BYTES:
            raise SpecError(
                f"constraints: value of {k} is over {human_bytes(MAX_CONSTRAINT_VALUE_BYTES)}"
            )
    for opt in ("workdir", "cwd"):
        val = getattr(out, opt)
        if val is not None and _encoded_size(val, opt) > MAX_PATH_BYTES:
            raise SpecError(f"{opt} is over {human_bytes(MAX_PATH_BYTES)}")
    if out.gpu_type is not None and len(out.gpu_type.encode("utf-8", "replace")) > 64:
        raise SpecError("gpu_type must be a short string such as A100")
    size = _encoded_size(stored, "job spec") if whole is None else whole
    if size > MAX_SPEC_BYTES:
        raise SpecError(
            f"job spec is {human_bytes(size)}; the limit is {human_bytes(MAX_SPEC_BYTES)}"
        )
    return stored


def validate_spec(spec: Any, version: int = COMMAND_VERSION) -> JobSpec:
    """The typed spec, or SpecError with one line. `version` is the command
    format whose limits apply (apply passes the command's own `v`)."""
    return validate_stored_spec(spec, version)[0]


def validate_stored_spec(
    spec: Any, version: int = COMMAND_VERSION
) -> tuple[JobSpec, dict[str, Any]]:
    """validate_spec, and the spec as a job keeps it (stored_spec), made once:
    the size check encodes it anyway, and apply keeps it."""
    v1 = version <= 1
    if not isinstance(spec, dict):
        raise SpecError("job spec must be a map")
    # Older formats had no arrays or dependencies: a replayed entry is
    # refused as it was when it was written.
    known = _SPEC_FIELDS if version >= WORKLOAD_FIELDS_SINCE else _SPEC_FIELDS_BEFORE_WORKLOADS
    if not known.issuperset(spec):
        unknown = sorted(str(k) for k in spec if k not in known)
        raise SpecError(f"unknown job field(s): {', '.join(unknown)}")
    argv = spec.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise SpecError("a job needs a command: give it after --")
    if len(argv) > MAX_ARGV or (v1 and sum(len(a) for a in argv) > V1_MAX_ARG_CHARS):
        raise SpecError("command line too long")
    if any("\x00" in a for a in argv) or not argv[0]:
        raise SpecError("command contains an empty program name or a NUL byte")
    gpu_type = spec.get("gpu_type")
    if gpu_type is not None and (not isinstance(gpu_type, str) or not 0 < len(gpu_type) <= 64):
        raise SpecError("gpu_type must be a short string such as A100")
    tl = spec.get("time_limit_s")
    time_limit = None if tl is None else _num(spec, "time_limit_s", 1, 366 * 86400, False, None)
    for flag in ("spread", "preemptible"):
        if flag in spec and not isinstance(spec[flag], bool):
            raise SpecError(f"{flag} must be true or false")
    for opt in ("workdir", "cwd"):
        if spec.get(opt) is not None and not isinstance(spec[opt], str):
            raise SpecError(f"{opt} must be a string")
    out = JobSpec(
        argv=list(argv),
        gpus=_num(spec, "gpus", 0, MAX_GPUS, True, 0),
        cpus=_num(spec, "cpus", 0.01, MAX_CPUS, False, 1.0),
        mem_bytes=_num(spec, "mem_bytes", 0, MAX_MEM, True, 0),
        nodes=_num(spec, "nodes", 1, MAX_NODES, True, 1),
        priority=_num(spec, "priority", -1000, 1000, True, 0),
        retries=_num(spec, "retries", 0, 100, True, 0),
        env=_env(spec, v1),
        gpu_type=gpu_type,
        gpu_mem_min=_num(spec, "gpu_mem_min", 0, MAX_MEM, True, 0),
        constraints=_str_map(
            spec, "constraints", LABEL, "label", V1_MAX_VALUE_CHARS if v1 else None
        ),
        spread=bool(spec.get("spread", False)),
        preemptible=bool(spec.get("preemptible", True)),
        time_limit_s=time_limit,
        workdir=spec.get("workdir"),
        cwd=spec.get("cwd"),
    )
    if version >= WORKLOAD_FIELDS_SINCE:
        _workload_fields(spec, out)
    return out, (stored_spec(out) if v1 else _check_sizes_v2(out))


_SPEC_FIELDS = frozenset(JobSpec.__dataclass_fields__)
_SPEC_FIELDS_BEFORE_WORKLOADS = _SPEC_FIELDS - frozenset(WORKLOAD_FIELDS)


def _workload_fields(spec: dict[str, Any], out: JobSpec) -> None:
    """Arrays and dependencies (version 4 on), checked into `out`."""
    if spec.get("array") is not None:
        try:
            out.array = check_ranges(spec["array"])
        except ArrayError as exc:
            raise SpecError(str(exc)) from None
        if out.nodes != 1:
            raise SpecError("an array's tasks run on one node each: --array takes no --nodes")
    if spec.get("max_running") is not None:
        if out.array is None:
            raise SpecError("--max-running limits the tasks of an array: give --array too")
        out.max_running = _num(spec, "max_running", 1, 1_000_000, True, None)
    seen: set[str] = set()
    for key in ("after_ok", "after_any"):
        ids = spec.get(key) or []
        if not ids:  # the usual case: no dependency of this kind
            setattr(out, key, [])
            continue
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise SpecError(f"{key} must be a list of job ids")
        for jid in ids:
            if not JOB_ID.match(jid):
                raise SpecError(f"{_shown(jid)} is not a job id")
            if jid in seen:
                raise SpecError(f"job {jid} is named twice in the dependencies")
            seen.add(jid)
        setattr(out, key, list(ids))
    if len(seen) > MAX_DEPENDENCIES:
        raise SpecError(f"a job waits for at most {MAX_DEPENDENCIES} jobs, got {len(seen)}")
    sig = spec.get("signal")
    if sig is not None:
        if not isinstance(sig, str) or sig not in WARN_SIGNALS:
            raise SpecError(f"signal must be one of {', '.join(WARN_SIGNALS)}, got {_shown(sig)}")
        out.signal = sig
        out.signal_before_s = _num(spec, "signal_before_s", 1, MAX_SIGNAL_BEFORE_S, False, None)
        if out.signal_before_s is None:
            raise SpecError("a warning signal needs a time before the end: --signal USR1@120s")
    elif spec.get("signal_before_s") is not None:
        raise SpecError("signal_before_s needs a signal: --signal USR1@120s")
    out.preempt_grace_s = _num(spec, "preempt_grace_s", 0, MAX_PREEMPT_GRACE_S, False, None)
    _terminal(spec, out)


def _terminal(spec: dict[str, Any], out: JobSpec) -> None:
    tty, size = spec.get("tty", False), spec.get("tty_size")
    if not isinstance(tty, bool):
        raise SpecError("tty must be true or false")
    if size is not None and not (
        tty
        and isinstance(size, list)
        and len(size) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 10_000 for x in size)
    ):
        raise SpecError("tty_size is [rows, columns] of a terminal (with tty)")
    if tty and (out.nodes != 1 or out.array is not None):
        raise SpecError("an interactive job is one task: no --nodes or --array with -t")
    out.tty, out.tty_size = tty, list(size) if size is not None else None


def stored_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec as a job keeps it: without the version-4 fields left at their
    defaults, so a job without an array or dependencies is stored (and
    weighs, in the per-user caps) exactly as before they existed.

    It shares its lists and maps with `spec` (validate_stored_spec builds
    them fresh, and the job keeps them unchanged): copying them would only
    make garbage."""
    out = spec.wire_fields()
    for key in WORKLOAD_FIELDS:
        if not out[key]:
            del out[key]
    return out


def spec_tasks(spec: dict[str, Any]) -> int:
    """How many tasks a stored spec makes: an array's indexes, or its gang."""
    if spec.get("array") is not None:
        return count(spec["array"])
    return int(spec.get("nodes", 1))


def spec_bytes(spec: dict[str, Any]) -> int:
    """What a job's spec weighs in the per-user pending caps: its encoding."""
    try:
        return encoded_size(spec)
    except (TypeError, ValueError, OverflowError):
        return 0


def validate_unix_user(name: Any) -> str:
    if not isinstance(name, str) or not UNIX_USER.match(name):
        raise SpecError(
            "a Unix user name is 1-32 letters, digits, '_', '.' or '-', starting with a "
            f"letter or '_', got {_shown(name)}"
        )
    return name


def validate_name(name: Any, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise SpecError(
            f"{what} must be 1-128 letters, digits, '.', '_' or '-', got {_shown(name)}"
        )
    return name


# What a host may say about itself when it registers (version 3 on): a
# compromised host must not be able to make node listings, metrics or
# placement misbehave with absurd figures or endless labels.
MAX_NODE_GPUS = 256
MAX_NODE_CPUS = MAX_CPUS
MAX_NODE_MEM = MAX_MEM
MAX_GPU_INDEX = 1023
MAX_GPU_TEXT = 128
MAX_NODE_LABELS = 64
MAX_LABEL_VALUE_BYTES = 256
MAX_ADDR_CHARS = 256
# Labels under this prefix are set by admins only (`node_label`); a host's
# own claims to them are ignored, so a job constrained on one never goes to a
# host only because that host says so.
ADMIN_LABEL_PREFIX = "admin/"


def _text(v: Any, what: str, limit: int) -> str:
    if not isinstance(v, str) or len(v) > limit or not v.isprintable():
        raise SpecError(f"{what} must be printable text of at most {limit} characters")
    return v


def validate_labels(v: Any, what: str = "labels") -> dict[str, str]:
    """Node labels: at most MAX_NODE_LABELS, names as job constraints take them,
    values short printable text."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise SpecError(f"{what} must be a map of label names to values")
    if len(v) > MAX_NODE_LABELS:
        raise SpecError(f"at most {MAX_NODE_LABELS} {what}, got {len(v)}")
    out: dict[str, str] = {}
    for k, val in v.items():
        if not isinstance(k, str) or not LABEL.match(k):
            raise SpecError(f"{what}: {_shown(k)} is not a valid label name")
        if not isinstance(val, str) or not val.isprintable():
            raise SpecError(f"{what}: the value of {k} must be printable text")
        if len(val.encode("utf-8", "replace")) > MAX_LABEL_VALUE_BYTES:
            raise SpecError(f"{what}: the value of {k} is over {MAX_LABEL_VALUE_BYTES} bytes")
        out[k] = val
    return out


def _gpu_of(g: Any) -> dict[str, Any]:
    if not isinstance(g, dict):
        raise SpecError("each GPU of a node must be a map")
    index = g.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_GPU_INDEX:
        raise SpecError(f"GPU index must be from 0 to {MAX_GPU_INDEX}, got {_shown(index)}")
    mem = g.get("mem_bytes", 0)
    if isinstance(mem, bool) or not isinstance(mem, int) or not 0 <= mem <= MAX_NODE_MEM:
        raise SpecError(f"GPU {index}: mem_bytes must be a whole number of bytes up to 64 TiB")
    domain = g.get("domain", -1)
    if isinstance(domain, bool) or not isinstance(domain, int) or not -1 <= domain <= 1 << 20:
        raise SpecError(f"GPU {index}: domain must be a small whole number")
    return {
        "index": index,
        "uuid": _text(g.get("uuid", ""), f"GPU {index} uuid", MAX_GPU_TEXT),
        "model": _text(g.get("model", ""), f"GPU {index} model", MAX_GPU_TEXT),
        "mem_bytes": mem,
        "domain": domain,
    }


def validate_node(n: Any) -> dict[str, Any]:
    """What a registering host says about itself, checked and normalized:
    {id, name, addr, cpus, mem_bytes, gpus, labels}. Labels under
    ADMIN_LABEL_PREFIX are dropped: only admins set those."""
    if not isinstance(n, dict):
        raise SpecError("a node description must be a map")
    nid = n.get("id")
    if not isinstance(nid, str) or not NAME.match(nid):
        raise SpecError(
            f"node id must be 1-128 letters, digits, '.', '_' or '-', got {_shown(nid)}"
        )
    gpus = n.get("gpus") or []
    if not isinstance(gpus, list) or len(gpus) > MAX_NODE_GPUS:
        raise SpecError(f"a node has at most {MAX_NODE_GPUS} GPUs")
    cpus = n.get("cpus")
    if (
        isinstance(cpus, bool)
        or not isinstance(cpus, int | float)
        or not 0 <= cpus <= MAX_NODE_CPUS
    ):
        raise SpecError(f"node cpus must be from 0 to {MAX_NODE_CPUS}, got {_shown(cpus)}")
    mem = n.get("mem_bytes")
    if isinstance(mem, bool) or not isinstance(mem, int) or not 0 <= mem <= MAX_NODE_MEM:
        raise SpecError(f"node mem_bytes must be from 0 to 64 TiB, got {_shown(mem)}")
    out_gpus = [_gpu_of(g) for g in gpus]
    if len({g["index"] for g in out_gpus}) != len(out_gpus):
        raise SpecError("node GPU indexes must be distinct")
    labels = validate_labels(n.get("labels"))
    return {
        "id": nid,
        "name": validate_name(n.get("name"), "node name"),
        "addr": _text(n.get("addr", ""), "node addr", MAX_ADDR_CHARS),
        "cpus": float(cpus),
        "mem_bytes": mem,
        "gpus": out_gpus,
        "labels": {k: v for k, v in labels.items() if not k.startswith(ADMIN_LABEL_PREFIX)},
    }
