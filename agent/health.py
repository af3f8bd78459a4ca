"""GPU health on the host: what went wrong with which GPU, in words.

Sources of events (DCGM's health checks, reduced to what NVML gives):

- NVML events, on a thread of their own (`NvmlEventWatcher`): critical Xid
  errors and double-bit ECC errors, as the driver reports them;
- a poll each heartbeat (`GpuProbe.poll_health`): retired pages pending,
  row remapping pending or failed, a GPU that fell off the bus (NVML
  answers "GPU is lost");
- for simulated GPUs, a fault file in the data dir that tests and people
  write to (`echo 'xid 79 gpu=2' > DATA/simulate/faults`, see FAULT_HELP).

`GpuHealth` counts every event (Xids by code, ECC errors by kind, for the
agent's /metrics) and marks a GPU unhealthy on the first event that is the
hardware's fault. Xids that are the application's (NVIDIA's device plugin
skips the same ones) are counted and leave the GPU healthy. A marked GPU
stays marked, across agent restarts (the marks are kept in the data dir),
until a reset passes its burn-in (agent/burnin.py). The agent reports the
marks in its heartbeats; the leader commits them (raft/gpuhealth.py).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leptond.clock import Clock
from leptond.fsutil import atomic_write

log = logging.getLogger("lepton.agent")

FAULTS_FILE = "gpu_faults.json"
# Xids caused by the application (a bad memory access, a kernel timeout...):
# counted, but the GPU stays healthy.
APP_XIDS = frozenset({13, 31, 43, 45, 68, 109})
XID_WORDS = {
    48: "double-bit ECC error",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recorded",
    64: "ECC page retirement or row remapping failed",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}
FAULT_HELP = (
    "one fault per line: 'xid N gpu=I', 'ecc dbe gpu=I', 'ecc sbe gpu=I', "
    "'retired-pages gpu=I', 'lost gpu=I', 'burnin-fail gpu=I' or 'burnin-slow gpu=I'"
)


@dataclass(frozen=True)
class GpuEvent:
    """kind: xid, ecc_dbe, ecc_sbe, retired_pages, remap_failed, lost,
    burnin_fail, burnin_slow (the last two: simulated GPUs' next burn-in)."""

    kind: str
    gpu: int
    xid: int = 0

    def reason(self) -> str | None:
        """Why this event makes the GPU unhealthy, or None when it does not."""
        if self.kind == "xid":
            if self.xid in APP_XIDS:
                return None
            return f"Xid {self.xid}: {XID_WORDS.get(self.xid, 'critical error')}"
        return {
            "ecc_dbe": "double-bit ECC error",
            "retired_pages": "retired pages pending: reset the GPU to retire them",
            "remap_failed": "row remapping failed",
            "lost": "GPU has fallen off the bus",
        }.get(self.kind)


class GpuHealth:
    """Marks and counts; safe to call from the NVML event thread."""

    def __init__(self, data_dir: Path, clock: Clock) -> None:
        self._path = data_dir / FAULTS_FILE
        self._clock = clock
        self._lock = threading.Lock()
        self.faults: dict[int, dict[str, Any]] = self._load()
        self.xids: Counter[tuple[int, int]] = Counter()  # (gpu, xid) -> events
        self.ecc: Counter[tuple[int, str]] = Counter()  # (gpu, "corrected"/"uncorrected")

    def _load(self) -> dict[int, dict[str, Any]]:
        try:
            raw = json.loads(self._path.read_text())
            return {int(f["index"]): dict(f) for f in raw}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring %s: %s", self._path, exc)
            return {}

    def _save(self) -> None:
        body = json.dumps([self.faults[i] for i in sorted(self.faults)]).encode()
        try:
            atomic_write(self._path, body)
        except OSError as exc:  # the leader keeps the marks anyway
            log.error("cannot save the GPU faults to %s: %s", self._path, exc)

    def record(self, ev: GpuEvent) -> None:
        with self._lock:
            if ev.kind == "xid":
                self.xids[ev.gpu, ev.xid] += 1
            elif ev.kind in ("ecc_dbe", "ecc_sbe"):
                self.ecc[ev.gpu, "uncorrected" if ev.kind == "ecc_dbe" else "corrected"] += 1
            why = ev.reason()
            if why is None or ev.gpu in self.faults:
                if why is None:
                    log.info("GPU %d: %s (the GPU stays in service)", ev.gpu, _describe(ev))
                return
            self.faults[ev.gpu] = {"index": ev.gpu, "reason": why, "at": self._clock.now()}
            self._save()
        log.error("GPU %d is unhealthy: %s; no new work goes to it", ev.gpu, why)

    def clear(self, gpu: int) -> None:
        with self._lock:
            if self.faults.pop(gpu, None) is not None:
                self._save()

    def report(self) -> list[dict[str, Any]]:
        """The marks, for the heartbeat: [{index, reason, at}] by index."""
        with self._lock:
            return [dict(self.faults[i]) for i in sorted(self.faults)]

    def counts(self) -> tuple[dict[tuple[int, int], int], dict[tuple[int, str], int]]:
        with self._lock:
            return dict(self.xids), dict(self.ecc)


def _describe(ev: GpuEvent) -> str:
    if ev.kind == "xid":
        return f"Xid {ev.xid} ({'an application error' if ev.xid in APP_XIDS else 'critical'})"
    return "single-bit ECC error, corrected" if ev.kind == "ecc_sbe" else ev.kind


# -- the fault file of simulated GPUs --------------------------------------------------
def parse_fault(line: str, gpu_count: int) -> GpuEvent:
    """One line of the fault file; ValueError (one line) when it is not one."""
    words = line.split()
    gpu = None
    rest = []
    for w in words:
        if w.startswith("gpu="):
            try:
                gpu = int(w[4:])
            except ValueError:
                raise ValueError(f"bad GPU index in {line!r} ({FAULT_HELP})") from None
        else:
            rest.append(w.lower())
    if gpu is None:
        raise ValueError(f"no gpu=I in {line!r} ({FAULT_HELP})")
    if not 0 <= gpu < gpu_count:
        raise ValueError(f"no simulated GPU {gpu} (this host has {gpu_count}) in {line!r}")
    if len(rest) == 2 and rest[0] == "xid" and rest[1].isdigit() and len(rest[1]) <= 6:
        return GpuEvent("xid", gpu, int(rest[1]))
    kinds = {
        ("ecc", "dbe"): "ecc_dbe",
        ("ecc", "sbe"): "ecc_sbe",
        ("retired-pages",): "retired_pages",
        ("lost",): "lost",
        ("burnin-fail",): "burnin_fail",
        ("burnin-slow",): "burnin_slow",
    }
    kind = kinds.get(tuple(rest))
    if kind is None:
        raise ValueError(f"unknown fault {line!r} ({FAULT_HELP})")
    return GpuEvent(kind, gpu)


def read_fault_file(path: Path, gpu_count: int, max_bytes: int = 1 << 20) -> list[GpuEvent]:
    """Take the faults written to `path` since the last call: the file is
    read and emptied, so each line is one event, once. Lines that are not a
    fault are logged (one line each) and skipped."""
    try:
        with open(path, "r+b") as f:
            data = f.read(max_bytes)
            f.seek(0)
            f.truncate()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read the fault file %s: %s", path, exc)
        return []
    out = []
    for raw in data.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.append(parse_fault(line[:200], gpu_count))
        except ValueError as exc:
            log.warning("%s: %s", path, exc)
    return out
