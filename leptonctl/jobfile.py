"""Job specs from flags or a job.toml file: the same fields either way."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from raft.arrays import ArrayError, parse_array

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# job.toml keys -> spec fields; every other key is an error.
TOML_KEYS = {
    "name",
    "command",
    "gpus",
    "cpus",
    "mem",
    "nodes",
    "priority",
    "retries",
    "env",
    "gpu_type",
    "gpu_mem",
    "constraints",
    "spread",
    "no_preempt",
    "time_limit",
    "workdir",
    "cwd",
    "array",
    "max_running",
    "after",
    "after_any",
    "after_ok",
    "signal",
    "preempt_grace",
}


class JobFileError(ValueError):
    pass


def parse_size(text: str | int) -> int:
    """'8G', '512M', '1.5GiB', 1024 -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise JobFileError(f"size must not be negative: {text}")
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise JobFileError(f"not a size: {text!r} (try 8G or 512M)")
    unit = (m.group(2) or "").lower()[:1]
    return int(float(m.group(1)) * _UNITS[unit])


def parse_duration(text: str | float | int) -> float:
    """'90', '90s', '30m', '2h', '1d' -> seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", str(text))
    if not m:
        raise JobFileError(f"not a duration: {text!r} (try 90s, 30m or 2h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_kv(items: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise JobFileError(f"{what} takes K=V, got {item!r}")
        out[k] = v
    return out


def parse_signal(text: Any) -> tuple[str, float]:
    """'USR1@120s' (or SIGUSR1@2m) -> ('USR1', 120.0)."""
    name, at, when = str(text).partition("@")
    name = name.strip().upper().removeprefix("SIG")
    if not at or not name or not when:
        raise JobFileError(f"--signal takes NAME@DURATION, e.g. USR1@120s, got {str(text)[:40]!r}")
    return name, parse_duration(when)


def job_ids(v: Any) -> list[str]:
    """Job ids from flags (repeatable, each JOB[,JOB]) or a job.toml list or string."""
    if v is None:
        return []
    items = [v] if isinstance(v, str) else list(v)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise JobFileError(f"a dependency is a job id, got {item!r}")
        out += [x.strip() for x in item.split(",") if x.strip()]
    return out


def load_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise JobFileError(f"{path}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise JobFileError(f"{path}: {exc}") from None
    unknown = sorted(set(data) - TOML_KEYS)
    if unknown:
        raise JobFileError(
            f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(TOML_KEYS))}"
        )
    return data


def to_spec(d: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """Merge of file and flag values (same names as job.toml) -> (name, spec)."""
    cmd = d.get("command")
    if isinstance(cmd, str):
        import shlex

        cmd = shlex.split(cmd)
    spec: dict[str, Any] = {"argv": cmd}
    for key in ("gpus", "cpus", "nodes", "priority", "retries", "gpu_type", "spread", "cwd"):
        if d.get(key) is not None:
            spec[key] = d[key]
    if d.get("mem") is not None:
        spec["mem_bytes"] = parse_size(d["mem"])
    if d.get("gpu_mem") is not None:
        spec["gpu_mem_min"] = parse_size(d["gpu_mem"])
    if d.get("time_limit") is not None:
        spec["time_limit_s"] = parse_duration(d["time_limit"])
    if d.get("no_preempt"):
        spec["preemptible"] = False
    if d.get("env"):
        spec["env"] = dict(d["env"])
    if d.get("constraints"):
        spec["constraints"] = dict(d["constraints"])
    if d.get("array") is not None:
        try:
            spec["array"] = parse_array(str(d["array"]))
        except ArrayError as exc:
            raise JobFileError(str(exc)) from None
    if d.get("signal") is not None:
        spec["signal"], spec["signal_before_s"] = parse_signal(d["signal"])
    if d.get("preempt_grace") is not None:
        spec["preempt_grace_s"] = parse_duration(d["preempt_grace"])
    if d.get("max_running") is not None:
        spec["max_running"] = d["max_running"]
    # --after is --after-any: after the jobs ended, in whatever state.
    after_any = job_ids(d.get("after")) + job_ids(d.get("after_any"))
    if after_any:
        spec["after_any"] = list(dict.fromkeys(after_any))
    if d.get("after_ok"):
        spec["after_ok"] = list(dict.fromkeys(job_ids(d["after_ok"])))
    name = d.get("name")
    return (str(name) if name is not None else None), spec
