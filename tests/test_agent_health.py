"""GPU health on the host (agent/health.py, the NVML parts of agent/probes.py):
which events make a GPU unhealthy, the fault file of simulated GPUs, NVML
events and polls through a stand-in for pynvml."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.health import GpuEvent, GpuHealth, parse_fault, read_fault_file
from agent.probes import NvmlEventWatcher, NvmlProbe, SimulatedGpuProbe
from leptond.clock import REAL
from tests.harness import wait_for
from tests.test_probes import FakeNvml, FakeNvmlError


def test_a_critical_xid_marks_the_gpu_and_an_applications_does_not(tmp_path: Path) -> None:
    h = GpuHealth(tmp_path, REAL)
    h.record(GpuEvent("xid", 1, 13))  # an illegal address in the application
    h.record(GpuEvent("ecc_sbe", 1))  # corrected
    assert h.report() == []
    h.record(GpuEvent("xid", 1, 79))
    h.record(GpuEvent("ecc_dbe", 1))  # already marked: the first reason stays
    [f] = h.report()
    assert (f["index"], f["reason"]) == (1, "Xid 79: GPU has fallen off the bus")
    xids, ecc = h.counts()
    assert xids == {(1, 13): 1, (1, 79): 1}
    assert ecc == {(1, "corrected"): 1, (1, "uncorrected"): 1}
    # The marks outlive the agent (kept in its data dir), until cleared.
    assert [f["index"] for f in GpuHealth(tmp_path, REAL).report()] == [1]
    h.clear(1)
    assert GpuHealth(tmp_path, REAL).report() == []


@pytest.mark.parametrize(
    ("line", "event"),
    [
        ("xid 79 gpu=2", GpuEvent("xid", 2, 79)),
        ("XID 48   gpu=0", GpuEvent("xid", 0, 48)),
        ("ecc dbe gpu=3", GpuEvent("ecc_dbe", 3)),
        ("gpu=1 ecc sbe", GpuEvent("ecc_sbe", 1)),
        ("retired-pages gpu=1", GpuEvent("retired_pages", 1)),
        ("lost gpu=0", GpuEvent("lost", 0)),
        ("burnin-fail gpu=0", GpuEvent("burnin_fail", 0)),
    ],
)
def test_fault_lines(line: str, event: GpuEvent) -> None:
    assert parse_fault(line, 4) == event


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("xid 79", "no gpu=I"),
        ("xid 79 gpu=4", "no simulated GPU 4"),
        ("xid 79 gpu=-1", "no simulated GPU -1"),
        ("xid 79 gpu=two", "bad GPU index"),
        ("xid 9999999999 gpu=1", "unknown fault"),
        ("melt gpu=1", "unknown fault"),
        ("😀😀😀😀 gpu=1", "unknown fault"),
    ],
)
def test_bad_fault_lines_say_what_is_wrong(line: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_fault(line, 4)


def test_the_fault_file_is_read_once_and_bad_lines_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "faults"
    assert read_fault_file(path, 2) == []  # none yet
    path.write_bytes(b"# a comment\nxid 79 gpu=1\n\xff\xfe junk\nlost gpu=0\n" + b"x" * 3000)
    assert read_fault_file(path, 2) == [GpuEvent("xid", 1, 79), GpuEvent("lost", 0)]
    assert path.read_bytes() == b""
    assert read_fault_file(path, 2) == []
    assert (
        sum("unknown fault" in r.getMessage() or "no gpu" in r.getMessage() for r in caplog.records)
        == 2
    )


def test_simulated_faults_change_what_the_gpu_reports(tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    probe = SimulatedGpuProbe(2, seed="n", fault_file=faults)
    faults.write_text("lost gpu=1\necc dbe gpu=0\nburnin-fail gpu=0\n")
    assert probe.poll_health() == [GpuEvent("lost", 1), GpuEvent("ecc_dbe", 0)]
    g0, g1 = probe.gpus()
    assert (g0.ecc_uncorrected, g0.ecc_errors) == (1, 1)
    assert (g1.util_pct, g1.temperature_c) == (-1, -1)  # off the bus
    assert probe.fail_burnin == {0}
    probe.reset(1)
    assert probe.gpus()[1].util_pct == 0


class EventNvml(FakeNvml):
    """Two GPUs; GPU 1 raises an Xid 79 event once, GPU 0 is lost to queries
    and has retired pages pending."""

    NVML_ERROR_TIMEOUT = 10
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_FEATURE_ENABLED = 1
    nvmlEventTypeSingleBitEccError = 1
    nvmlEventTypeDoubleBitEccError = 2
    nvmlEventTypeXidCriticalError = 8

    def __init__(self) -> None:
        super().__init__(fail=set())
        self.events = [SimpleNamespace(device=1, eventType=8, eventData=79)]
        self.registered: list[int] = []
        self.freed = threading.Event()
        self.lost: set[int] = set()

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetIndex(self, h: int) -> int:
        return h

    def nvmlDeviceGetSupportedEventTypes(self, h: int) -> int:
        return 0xFF

    def nvmlEventSetCreate(self) -> str:
        return "set"

    def nvmlDeviceRegisterEvents(self, h: int, mask: int, es: Any) -> None:
        self.registered.append(h)

    def nvmlEventSetWait_v2(self, es: Any, ms: int) -> Any:
        if self.events:
            return self.events.pop()
        err = FakeNvmlError("timeout")
        err.value = self.NVML_ERROR_TIMEOUT  # type: ignore[attr-defined]
        raise err

    def nvmlEventSetFree(self, es: Any) -> None:
        self.freed.set()

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        if h in self.lost:
            err = FakeNvmlError("GPU is lost")
            err.value = self.NVML_ERROR_GPU_IS_LOST  # type: ignore[attr-defined]
            raise err
        return 50

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: int) -> int:
        return 1 if h == 1 else 0

    def nvmlDeviceGetRemappedRows(self, h: int) -> tuple[int, int, int, int]:
        return (0, 0, 0, 0)


def test_nvml_events_and_polls_reach_the_health_record(tmp_path: Path) -> None:
    lib = EventNvml()
    probe = NvmlProbe(lib)
    health = GpuHealth(tmp_path, REAL)
    watcher = NvmlEventWatcher(probe, health.record, wait_ms=10)
    watcher.start()
    try:
        wait_for(lambda: health.report(), 10, "the Xid event")
        assert lib.registered == [0, 1] == watcher.registered
        [f] = health.report()
        assert (f["index"], f["reason"]) == (1, "Xid 79: GPU has fallen off the bus")
    finally:
        watcher.close()
    assert lib.freed.is_set()
    lib.lost.add(0)
    assert probe.poll_health() == [GpuEvent("lost", 0), GpuEvent("retired_pages", 1)]
    probe.close()
