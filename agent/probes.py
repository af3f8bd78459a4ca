"""Host probes: what GPUs a node has, how busy they are, and host-wide stats.

The agent reports these in `register_node` and in every heartbeat. GPU access
sits behind the small `GpuProbe` protocol so that a host without NVIDIA hardware
(CI, laptops, scale tests) runs the same code with `SimulatedGpuProbe`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psutil

from .health import GpuEvent, read_fault_file

log = logging.getLogger("lepton.agent")

GiB = 1 << 30
DEFAULT_SIM_MODEL = "Simulated A100"
DEFAULT_SIM_MEM_BYTES = 80 * GiB
# Simulated hosts look like the common 8-GPU board: two groups of four GPUs,
# each group on one NUMA node / NVLink island.
SIM_GPUS_PER_DOMAIN = 4


@dataclass(frozen=True)
class GpuStat:
    """One GPU as the scheduler sees it. Numbers NVML cannot give are -1."""

    index: int
    uuid: str
    name: str
    mem_total_bytes: int
    mem_used_bytes: int
    util_pct: int
    mem_util_pct: int
    temperature_c: int
    power_w: float
    ecc_errors: int  # volatile corrected + uncorrected; -1 when unsupported
    domain: int  # NUMA/NVLink domain for topology-aware placement; -1 unknown
    # Volatile ECC error counts (since the driver loaded); -1 when unsupported.
    ecc_corrected: int = -1
    ecc_uncorrected: int = -1


class GpuProbe(Protocol):
    name: str

    def gpus(self) -> list[GpuStat]: ...

    def poll_health(self) -> list[GpuEvent]:
        """Faults found by looking (agent/health.py), checked every heartbeat."""
        ...

    def close(self) -> None: ...


# --------------------------------------------------------------------- NVML

T = TypeVar("T")


class NvmlProbe:
    """GPUs through NVML. `lib` is the pynvml module, or a fake with its API."""

    name = "nvml"

    def __init__(self, lib: Any = None) -> None:
        if lib is None:
            import pynvml

            lib = pynvml
        self._nvml = lib
        # nvmlInit is reference counted in the driver; do it exactly once per
        # probe and pair it with one nvmlShutdown in close().
        self._nvml.nvmlInit()
        self._closed = False
        self._lock = threading.Lock()

    def _field(self, fn: Callable[[], T], default: T) -> T:
        # Old drivers and consumer cards lack some queries (ECC, power, NUMA).
        # One missing field must not hide the GPU or the other fields.
        try:
            return fn()
        except self._nvml.NVMLError:
            return default

    def gpus(self) -> list[GpuStat]:
        with self._lock:
            if self._closed:
                return []
            try:
                count = int(self._nvml.nvmlDeviceGetCount())
            except self._nvml.NVMLError as e:
                log.warning("NVML could not count GPUs: %s", e)
                return []
            out: list[GpuStat] = []
            for i in range(count):
                try:
                    handle = self._nvml.nvmlDeviceGetHandleByIndex(i)
                except self._nvml.NVMLError as e:
                    log.warning("NVML could not open GPU %d: %s", i, e)
                    continue
                out.append(self._stat(i, handle))
            return out

    def minor_numbers(self) -> dict[int, int]:
        """GPU index -> the minor number of its /dev/nvidia<N> device file."""
        out: dict[int, int] = {}
        with self._lock:
            if self._closed:
                return out
            try:
                count = int(self._nvml.nvmlDeviceGetCount())
                for i in range(count):
                    h = self._nvml.nvmlDeviceGetHandleByIndex(i)
                    out[i] = int(self._nvml.nvmlDeviceGetMinorNumber(h))
            except self._nvml.NVMLError as e:
                log.warning("NVML could not give the GPUs' device numbers: %s", e)
        return out

    def _stat(self, index: int, h: Any) -> GpuStat:
        nv = self._nvml
        mem = self._field(lambda: nv.nvmlDeviceGetMemoryInfo(h), None)
        util = self._field(lambda: nv.nvmlDeviceGetUtilizationRates(h), None)
        power_mw = self._field(lambda: float(nv.nvmlDeviceGetPowerUsage(h)), -1000.0)
        ecc = self._ecc(h)
        return GpuStat(
            index=index,
            uuid=_text(self._field(lambda: nv.nvmlDeviceGetUUID(h), "")),
            name=_text(self._field(lambda: nv.nvmlDeviceGetName(h), "")),
            mem_total_bytes=int(mem.total) if mem is not None else 0,
            mem_used_bytes=int(mem.used) if mem is not None else 0,
            util_pct=int(util.gpu) if util is not None else -1,
            mem_util_pct=int(util.memory) if util is not None else -1,
            temperature_c=self._field(
                lambda: int(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)), -1
            ),
            power_w=power_mw / 1000.0,
            ecc_errors=-1 if min(ecc) < 0 else sum(ecc),
            domain=self._domain(h),
            ecc_corrected=ecc[0],
            ecc_uncorrected=ecc[1],
        )

    def _ecc(self, h: Any) -> tuple[int, int]:
        """Volatile (corrected, uncorrected) ECC errors; -1s when ECC is off
        or unsupported (most consumer cards)."""
        nv = self._nvml
        out = []
        for kind in (nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED):
            try:
                out.append(int(nv.nvmlDeviceGetTotalEccErrors(h, kind, nv.NVML_VOLATILE_ECC)))
            except nv.NVMLError:
                return -1, -1
        return out[0], out[1]

    def poll_health(self) -> list[GpuEvent]:
        """A GPU off the bus, retired pages pending, row remapping failed."""
        nv = self._nvml
        out: list[GpuEvent] = []
        with self._lock:
            if self._closed:
                return out
            try:
                count = int(nv.nvmlDeviceGetCount())
            except nv.NVMLError:
                return out
            for i in range(count):
                try:
                    h = nv.nvmlDeviceGetHandleByIndex(i)
                    nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
                except nv.NVMLError as e:
                    if _is_lost(nv, e):
                        out.append(GpuEvent("lost", i))
                    continue
                out.extend(self._memory_health(i, h))
        return out

    def _memory_health(self, index: int, h: Any) -> list[GpuEvent]:
        nv = self._nvml
        out = []
        pending = self._field(lambda: nv.nvmlDeviceGetRetiredPagesPendingStatus(h), 0)
        if pending == getattr(nv, "NVML_FEATURE_ENABLED", 1):
            out.append(GpuEvent("retired_pages", index))
        rows = self._field(lambda: nv.nvmlDeviceGetRemappedRows(h), None)
        if isinstance(rows, tuple | list) and len(rows) >= 4 and rows[3]:
            out.append(GpuEvent("remap_failed", index))
        return out

    def _domain(self, h: Any) -> int:
        # GPUs on one NUMA node share a PCIe root complex and, on HGX boards,
        # an NVLink island; the NUMA node is the cheapest stable id for that.
        node = self._field(lambda: int(self._nvml.nvmlDeviceGetNumaNodeId(h)), -1)
        if node >= 0:
            return node
        pci = self._field(lambda: self._nvml.nvmlDeviceGetPciInfo(h), None)
        bus_id = _text(getattr(pci, "busId", b"")) if pci is not None else ""
        return _sysfs_numa_node(bus_id)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as e:
                log.debug("nvmlShutdown failed: %s", e)


class NvmlEventWatcher:
    """NVML events on a thread of their own: critical Xids and ECC errors go
    to `sink` (GpuHealth.record) as they happen. The thread waits at most
    `wait_ms` at a time, so `close` ends it within that."""

    def __init__(self, probe: NvmlProbe, sink: Callable[[GpuEvent], None], wait_ms: int = 1000):
        self._nv = probe._nvml
        self._sink = sink
        self._wait_ms = wait_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-events", daemon=True)
        self.registered: list[int] = []  # GPU indexes whose events are watched

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._wait_ms / 1000 + 1)

    def _register(self) -> Any:
        nv = self._nv
        wanted = (
            nv.nvmlEventTypeXidCriticalError
            | nv.nvmlEventTypeDoubleBitEccError
            | nv.nvmlEventTypeSingleBitEccError
        )
        es = nv.nvmlEventSetCreate()
        for i in range(int(nv.nvmlDeviceGetCount())):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
                supported = int(nv.nvmlDeviceGetSupportedEventTypes(h))
                nv.nvmlDeviceRegisterEvents(h, wanted & supported, es)
                self.registered.append(i)
            except nv.NVMLError as e:
                log.warning("GPU %d: NVML events unavailable (%s); polling only", i, e)
        return es

    def _run(self) -> None:
        nv = self._nv
        try:
            es = self._register()
        except Exception as e:  # NVMLError subclasses, a driver without events
            log.warning("NVML events unavailable (%s); GPU health is polled only", e)
            return
        try:
            while not self._stop.is_set():
                try:
                    data = nv.nvmlEventSetWait_v2(es, self._wait_ms)
                except nv.NVMLError as e:
                    if getattr(e, "value", None) == nv.NVML_ERROR_TIMEOUT:
                        continue
                    log.warning("waiting for NVML events failed (%s); polling only", e)
                    return
                ev = self._event(data)
                if ev is not None:
                    self._sink(ev)
        finally:
            try:
                nv.nvmlEventSetFree(es)
            except nv.NVMLError:
                pass

    def _event(self, data: Any) -> GpuEvent | None:
        nv = self._nv
        try:
            index = int(nv.nvmlDeviceGetIndex(data.device))
        except nv.NVMLError:
            return None
        kind = int(data.eventType)
        if kind & nv.nvmlEventTypeXidCriticalError:
            return GpuEvent("xid", index, int(data.eventData))
        if kind & nv.nvmlEventTypeDoubleBitEccError:
            return GpuEvent("ecc_dbe", index)
        if kind & nv.nvmlEventTypeSingleBitEccError:
            return GpuEvent("ecc_sbe", index)
        return None


def _is_lost(nv: Any, e: Exception) -> bool:
    lost = getattr(nv, "NVML_ERROR_GPU_IS_LOST", 15)
    return getattr(e, "value", None) == lost


def _text(v: Any) -> str:
    # pynvml returns bytes on older releases and str on newer ones.
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def _sysfs_numa_node(bus_id: str, sysfs: Path = Path("/sys/bus/pci/devices")) -> int:
    """NUMA node of a PCI device from sysfs, -1 when unknown.

    NVML spells bus ids with an 8-digit domain ("00000000:3B:00.0"); sysfs
    uses 4 digits in lower case ("0000:3b:00.0").
    """
    m = re.fullmatch(r"([0-9A-Fa-f]+):([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2})\.([0-7])", bus_id.strip())
    if not m:
        return -1
    dom, bus, dev, fn = m.groups()
    name = f"{int(dom, 16):04x}:{bus.lower()}:{dev.lower()}.{fn}"
    try:
        node = int((sysfs / name / "numa_node").read_text().strip())
    except (OSError, ValueError):
        return -1
    return node if node >= 0 else -1


def open_nvml(lib: Any = None) -> NvmlProbe | None:
    """An NVML probe, or None (after one log line) when NVML is unusable."""
    try:
        return NvmlProbe(lib)
    except ImportError as e:
        log.warning("NVML unavailable (pynvml not importable: %s); reporting no NVIDIA GPUs", e)
    except Exception as e:  # NVMLError and its many subclasses, driver load errors
        log.warning("NVML unavailable (%s); reporting no NVIDIA GPUs", e)
    return None


# ---------------------------------------------------------------- simulated


class SimulatedGpuProbe:
    """Fake GPUs for hosts without NVIDIA hardware and for tests.

    UUIDs derive from `seed` (the node name), so a restarted agent reports the
    same GPUs and the leader's allocations stay valid across the restart.
    """

    name = "simulated"

    def __init__(
        self,
        count: int,
        model: str = DEFAULT_SIM_MODEL,
        mem_bytes: int = DEFAULT_SIM_MEM_BYTES,
        seed: str = "",
        fault_file: Path | None = None,
    ) -> None:
        if count < 0:
            raise ValueError(f"simulated GPU count must be >= 0, got {count}")
        if mem_bytes <= 0:
            raise ValueError(f"simulated GPU memory must be > 0 bytes, got {mem_bytes}")
        self.count = count
        self.model = model
        self.mem_bytes = mem_bytes
        self._uuids = [simulated_uuid(seed, i) for i in range(count)]
        self._busy: frozenset[int] = frozenset()
        # Injected faults (agent/health.py's fault file): GPUs off the bus,
        # ECC error counts, and GPUs whose next burn-in fails.
        self.fault_file = fault_file
        self.lost: set[int] = set()
        self.ecc = [[0, 0] for _ in range(count)]  # [corrected, uncorrected] per GPU
        self.fail_burnin: set[int] = set()
        # GPUs whose burn-ins take SLOW_BURN_IN_S longer (as a real one on a
        # loaded host or a large GPU does), until one gets past that.
        self.slow_burnin: set[int] = set()

    def set_busy(self, indices: Iterable[int]) -> None:
        """Mark which GPUs tasks hold; busy GPUs report load, idle ones none."""
        busy = frozenset(indices)
        bad = sorted(i for i in busy if not 0 <= i < self.count)
        if bad:
            raise ValueError(f"no simulated GPU with index {bad[0]} (host has {self.count})")
        self._busy = busy  # one reference swap: safe to read from other threads

    def gpus(self) -> list[GpuStat]:
        busy = self._busy
        return [self._stat(i, i in busy) for i in range(self.count)]

    def _stat(self, i: int, busy: bool) -> GpuStat:
        corrected, uncorrected = self.ecc[i]
        if i in self.lost:  # off the bus: NVML would answer nothing
            busy = False
        return GpuStat(
            index=i,
            uuid=self._uuids[i],
            name=self.model,
            mem_total_bytes=self.mem_bytes,
            mem_used_bytes=self.mem_bytes * 9 // 10 if busy else 0,
            util_pct=-1 if i in self.lost else 95 if busy else 0,
            mem_util_pct=60 if busy else 0,
            temperature_c=-1 if i in self.lost else 70 if busy else 35,
            power_w=300.0 if busy else 60.0,
            ecc_errors=corrected + uncorrected,
            domain=i // SIM_GPUS_PER_DOMAIN,
            ecc_corrected=corrected,
            ecc_uncorrected=uncorrected,
        )

    def poll_health(self) -> list[GpuEvent]:
        """The faults written to the fault file since the last poll; each one
        also changes what the simulated GPU reports."""
        if self.fault_file is None:
            return []
        out = []
        for ev in read_fault_file(self.fault_file, self.count):
            if ev.kind == "burnin_fail":
                self.fail_burnin.add(ev.gpu)
                continue
            if ev.kind == "burnin_slow":
                self.slow_burnin.add(ev.gpu)
                continue
            if ev.kind == "lost":
                self.lost.add(ev.gpu)
            elif ev.kind in ("ecc_sbe", "ecc_dbe"):
                self.ecc[ev.gpu][ev.kind == "ecc_dbe"] += 1
            out.append(ev)
        return out

    def reset(self, index: int) -> None:
        """What a GPU reset does to a simulated GPU: back on the bus."""
        self.lost.discard(index)

    def close(self) -> None:
        pass


def simulated_uuid(seed: str, index: int) -> str:
    digest = hashlib.sha256(f"lepton-sim-gpu:{seed}:{index}".encode()).digest()
    return "GPU-" + str(uuid.UUID(bytes=digest[:16]))


_MEM_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SPEC_HELP = "expected N[:MODEL[:MEM]], e.g. 8 or 8:H100:80G"


def parse_mem(text: str) -> int:
    """Bytes from "80G", "40GiB", "24000M", "1T" or a plain byte count.

    GPU memory is sold in binary units, so G, GB and GiB all mean 2**30.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"invalid GPU memory {text!r}: expected a size like 80G, 40GiB or 24000M")
    value = float(m.group(1)) * _MEM_UNITS[m.group(2).upper()]
    if value < 1:
        raise ValueError(f"invalid GPU memory {text!r}: must be more than 0 bytes")
    return int(value)


def parse_simulate_spec(spec: str) -> tuple[int, str, int]:
    """Parse --simulate-gpus "N[:MODEL[:MEM]]" into (count, model, mem_bytes)."""
    parts = spec.split(":")
    if len(parts) > 3:
        raise ValueError(f"invalid simulated GPU spec {spec!r}: too many ':' ({_SPEC_HELP})")
    count_s = parts[0].strip()
    if not count_s.isdigit():
        raise ValueError(
            f"invalid simulated GPU spec {spec!r}: GPU count must be a whole number ({_SPEC_HELP})"
        )
    count = int(count_s)
    if count > 1024:
        raise ValueError(f"invalid simulated GPU spec {spec!r}: at most 1024 GPUs per host")
    model = parts[1].strip() if len(parts) > 1 and parts[1].strip() else DEFAULT_SIM_MODEL
    mem = DEFAULT_SIM_MEM_BYTES
    if len(parts) > 2 and parts[2].strip():
        try:
            mem = parse_mem(parts[2])
        except ValueError as e:
            raise ValueError(f"invalid simulated GPU spec {spec!r}: {e}") from None
    return count, model, mem


def make_gpu_probe(simulate: str | None, seed: str, fault_file: Path | None = None) -> GpuProbe:
    """Simulated GPUs when asked for (taking faults from `fault_file`), else
    NVML, else a probe with no GPUs."""
    if simulate:
        count, model, mem = parse_simulate_spec(simulate)
        return SimulatedGpuProbe(count, model, mem, seed=seed, fault_file=fault_file)
    probe = open_nvml()
    if probe is not None:
        return probe
    return SimulatedGpuProbe(0, seed=seed)


# --------------------------------------------------------------------- host


@dataclass(frozen=True)
class HostStats:
    cpu_count: int
    cpu_percent: float  # since the previous call (0.0 on the first one)
    load_1: float
    load_5: float
    load_15: float
    mem_total_bytes: int
    mem_available_bytes: int
    disk_total_bytes: int  # of the file system holding the data dir
    disk_free_bytes: int
    net_bytes_sent: int
    net_bytes_recv: int
    boot_time: float  # seconds since the epoch


def host_stats(data_dir: Path) -> HostStats:
    """A snapshot of host load; never blocks (cpu_percent uses the last call)."""
    load = psutil.getloadavg()
    mem = psutil.virtual_memory()
    disk = psutil.disk_usage(str(_existing_ancestor(data_dir)))
    net = psutil.net_io_counters()
    return HostStats(
        cpu_count=psutil.cpu_count(logical=True) or 1,
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        load_1=load[0],
        load_5=load[1],
        load_15=load[2],
        mem_total_bytes=int(mem.total),
        mem_available_bytes=int(mem.available),
        disk_total_bytes=int(disk.total),
        disk_free_bytes=int(disk.free),
        net_bytes_sent=int(net.bytes_sent) if net is not None else 0,
        net_bytes_recv=int(net.bytes_recv) if net is not None else 0,
        boot_time=float(psutil.boot_time()),
    )


def _existing_ancestor(p: Path) -> Path:
    # The data dir may not exist yet on first boot; its file system is what
    # matters, so measure the nearest directory that does exist.
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p
