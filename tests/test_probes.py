"""GPU and host probes: simulated GPUs, spec parsing, NVML fallbacks, host stats."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent import probes
from agent.probes import (
    GiB,
    NvmlProbe,
    SimulatedGpuProbe,
    host_stats,
    make_gpu_probe,
    open_nvml,
    parse_simulate_spec,
)


def test_simulated_uuids_are_stable_per_seed_and_unique() -> None:
    a = [g.uuid for g in SimulatedGpuProbe(8, seed="node-a").gpus()]
    again = [g.uuid for g in SimulatedGpuProbe(8, seed="node-a").gpus()]
    other = [g.uuid for g in SimulatedGpuProbe(8, seed="node-b").gpus()]
    assert a == again
    assert len(set(a)) == 8
    assert not set(a) & set(other)
    assert all(u.startswith("GPU-") for u in a)


def test_simulated_gpus_report_model_memory_and_domains() -> None:
    gpus = SimulatedGpuProbe(10, model="H100", mem_bytes=80 * GiB, seed="n").gpus()
    assert [g.index for g in gpus] == list(range(10))
    assert {g.name for g in gpus} == {"H100"}
    assert {g.mem_total_bytes for g in gpus} == {80 * GiB}
    assert [g.domain for g in gpus] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_set_busy_shows_load_only_on_held_gpus() -> None:
    probe = SimulatedGpuProbe(4, seed="n")
    assert all(g.util_pct == 0 and g.mem_used_bytes == 0 for g in probe.gpus())
    probe.set_busy([1, 3])
    busy = {g.index for g in probe.gpus() if g.util_pct > 0 and g.mem_used_bytes > 0}
    assert busy == {1, 3}
    probe.set_busy([])
    assert all(g.util_pct == 0 for g in probe.gpus())
    with pytest.raises(ValueError, match="index 4"):
        probe.set_busy([4])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("8", (8, "Simulated A100", 80 * GiB)),
        ("0", (0, "Simulated A100", 80 * GiB)),
        ("2:H100", (2, "H100", 80 * GiB)),
        ("4:A10G:24G", (4, "A10G", 24 * GiB)),
        ("1:L4:40GiB", (1, "L4", 40 * GiB)),
        ("1:T4:24000M", (1, "T4", 24000 << 20)),
        ("3::16gb", (3, "Simulated A100", 16 * GiB)),
    ],
)
def test_parse_simulate_spec(spec: str, expected: tuple[int, str, int]) -> None:
    assert parse_simulate_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("", "count"),
        ("eight", "count"),
        ("-1", "count"),
        ("2.5", "count"),
        ("2:H100:lots", "memory"),
        ("2:H100:0G", "more than 0"),
        ("2:H100:80X", "memory"),
        ("1:a:80G:extra", "too many"),
        ("5000", "at most"),
    ],
)
def test_parse_simulate_spec_rejects_nonsense_with_a_clear_error(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as e:
        parse_simulate_spec(spec)
    assert repr(spec) in str(e.value)


def test_make_gpu_probe_uses_the_simulate_spec() -> None:
    probe = make_gpu_probe("2:H100:80G", seed="node-1")
    assert probe.name == "simulated"
    assert [g.name for g in probe.gpus()] == ["H100", "H100"]
    probe.close()


def _no_nvml_here() -> bool:
    p = open_nvml()
    if p is None:
        return True
    p.close()
    return False


@pytest.mark.skipif(not _no_nvml_here(), reason="this host has a working NVML")
def test_make_gpu_probe_without_nvml_logs_one_line_and_reports_no_gpus(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="lepton.agent"):
        probe = make_gpu_probe(None, seed="node-1")
    assert probe.gpus() == []
    assert probe.name == "simulated"
    lines = [r for r in caplog.records if r.name == "lepton.agent"]
    assert len(lines) == 1
    assert "NVML unavailable" in lines[0].getMessage()
    probe.close()


@pytest.mark.skipif(_no_nvml_here(), reason="NVML does not initialise on this host")
def test_nvml_probe_reports_real_gpus() -> None:
    probe = NvmlProbe()
    try:
        gpus = probe.gpus()
        assert gpus, "NVML initialised but reported no GPUs"
        for g in gpus:
            assert g.uuid.startswith("GPU-")
            assert g.mem_total_bytes > 0
            assert 0 <= g.mem_used_bytes <= g.mem_total_bytes
    finally:
        probe.close()


# A stand-in for the pynvml module: one healthy GPU whose driver lacks the
# ECC, power and NUMA queries, as old drivers and consumer cards do.
class FakeNvmlError(Exception):
    pass


class FakeNvml:
    NVMLError = FakeNvmlError
    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0

    def __init__(self, fail: set[str]) -> None:
        self.fail = fail
        self.inits = 0
        self.shutdowns = 0

    def _maybe_fail(self, name: str) -> None:
        if name in self.fail:
            raise FakeNvmlError(f"{name}: Not Supported")

    def nvmlInit(self) -> None:
        self._maybe_fail("init")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return b"GPU-11111111-2222-3333-4444-555555555555"

    def nvmlDeviceGetName(self, h: int) -> str:
        return "NVIDIA Test"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(total=16 * GiB, used=GiB, free=15 * GiB)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        self._maybe_fail("util")
        return SimpleNamespace(gpu=42, memory=7)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 55

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        self._maybe_fail("power")
        return 123_000

    def nvmlDeviceGetTotalEccErrors(self, h: int, kind: int, counter: int) -> int:
        self._maybe_fail("ecc")
        return 2 if kind == 0 else 1

    def nvmlDeviceGetNumaNodeId(self, h: int) -> int:
        self._maybe_fail("numa")
        return 1

    def nvmlDeviceGetPciInfo(self, h: int) -> SimpleNamespace:
        self._maybe_fail("pci")
        return SimpleNamespace(busId=b"00000000:3B:00.0")


def test_nvml_probe_reads_every_field() -> None:
    lib = FakeNvml(fail=set())
    probe = NvmlProbe(lib)
    [g] = probe.gpus()
    assert g.uuid == "GPU-11111111-2222-3333-4444-555555555555"
    assert (g.name, g.mem_total_bytes, g.mem_used_bytes) == ("NVIDIA Test", 16 * GiB, GiB)
    assert (g.util_pct, g.mem_util_pct, g.temperature_c) == (42, 7, 55)
    assert g.power_w == pytest.approx(123.0)
    assert (g.ecc_errors, g.domain) == (3, 1)
    probe.close()
    probe.close()
    assert (lib.inits, lib.shutdowns) == (1, 1)


def test_nvml_probe_turns_missing_queries_into_minus_one() -> None:
    probe = NvmlProbe(FakeNvml(fail={"util", "power", "ecc", "numa", "pci"}))
    [g] = probe.gpus()
    assert g.mem_total_bytes == 16 * GiB
    assert (g.util_pct, g.mem_util_pct, g.power_w, g.ecc_errors, g.domain) == (-1, -1, -1.0, -1, -1)
    probe.close()


def test_open_nvml_returns_none_when_init_fails(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lepton.agent"):
        assert open_nvml(FakeNvml(fail={"init"})) is None
    assert [r.getMessage() for r in caplog.records].count(
        "NVML unavailable (init: Not Supported); reporting no NVIDIA GPUs"
    ) == 1


def test_sysfs_numa_node_maps_nvml_bus_ids(tmp_path: Path) -> None:
    dev = tmp_path / "0000:3b:00.0"
    dev.mkdir()
    (dev / "numa_node").write_text("1\n")
    assert probes._sysfs_numa_node("00000000:3B:00.0", sysfs=tmp_path) == 1
    assert probes._sysfs_numa_node("00000000:AF:00.0", sysfs=tmp_path) == -1
    assert probes._sysfs_numa_node("garbage", sysfs=tmp_path) == -1
    (dev / "numa_node").write_text("-1\n")
    assert probes._sysfs_numa_node("00000000:3B:00.0", sysfs=tmp_path) == -1


def test_host_stats_are_sane(tmp_path: Path) -> None:
    s = host_stats(tmp_path / "not-created-yet")
    assert s.cpu_count >= 1
    assert 0.0 <= s.cpu_percent <= 100.0 * s.cpu_count
    assert min(s.load_1, s.load_5, s.load_15) >= 0.0
    assert 0 < s.mem_available_bytes <= s.mem_total_bytes
    assert 0 < s.disk_free_bytes <= s.disk_total_bytes
    assert s.net_bytes_sent >= 0 and s.net_bytes_recv >= 0
    assert s.boot_time > 0
