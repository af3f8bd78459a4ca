"""The device file of each GPU on this host, by GPU index.

Real NVIDIA GPUs are /dev/nvidia<minor> (character major 195, minor from
NVML). Simulated GPUs get real device files too, so the device rules run on
hosts without GPUs: character devices 195:0..N-1 named nvidia0..nvidia<N-1>
in `<data dir>/dev/`. With no driver behind major 195, opening one that the
rules allow fails with ENXIO and one they deny with EPERM.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("lepton.agent")

NVIDIA_MAJOR = 195


@dataclass(frozen=True)
class GpuDevices:
    dir: Path | None  # what LEPTON_GPU_DEVICE_DIR says; None: no device files
    paths: dict[int, str]  # GPU index -> its device file

    def others(self, mine: list[int]) -> list[str]:
        """The device files of this host's GPUs that are not in `mine`."""
        return [p for i, p in sorted(self.paths.items()) if i not in set(mine)]


def simulated(data_dir: Path, count: int) -> GpuDevices:
    """Make (or keep) the simulated GPUs' device files; needs root (mknod)."""
    d = data_dir / "dev"
    try:
        # Passable, not listable: a task opens its own GPUs' files by name.
        d.mkdir(mode=0o711, exist_ok=True)
        os.chmod(d, 0o711)
        paths = {}
        for i in range(count):
            p = d / f"nvidia{i}"
            _mknod(p, os.makedev(NVIDIA_MAJOR, i))
            paths[i] = str(p)
    except OSError as e:
        log.warning("cannot create simulated GPU device files in %s: %s", d, e.strerror)
        return GpuDevices(None, {})
    return GpuDevices(d, paths)


def _mknod(p: Path, dev: int) -> None:
    try:
        st = p.lstat()
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == dev:
            os.chmod(p, 0o666)
            return
        p.unlink()  # something else under that name: replace it
    except FileNotFoundError:
        pass
    os.mknod(p, stat.S_IFCHR | 0o666, dev)
    os.chmod(p, 0o666)  # like the driver's own nodes; the device rules decide


def nvml(probe: Any, dev_dir: Path = Path("/dev")) -> GpuDevices:
    """Device files of the GPUs NVML sees: /dev/nvidia<minor number>."""
    minors = getattr(probe, "minor_numbers", None)
    if minors is None:
        return GpuDevices(None, {})
    paths = {i: str(dev_dir / f"nvidia{m}") for i, m in minors().items()}
    return GpuDevices(dev_dir, paths)


def device_number(path: str) -> tuple[int, int] | None:
    """(major, minor) of a character device file, None for anything else."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISCHR(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)
