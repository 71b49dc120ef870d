"""Energy a process's devices used, from the counters the hardware keeps: NVML on NVIDIA GPUs, RAPL on CPUs.

Every reader answers "joules since start()" or None; None means "not measurable here" and is reported
as unavailable, never replaced by an estimate from TDP or utilisation.

- NVIDIA GPUs (Volta and newer) keep a total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
  millijoules since the driver loaded): reading it twice is exact and costs nothing between reads.
  Older GPUs only report instantaneous power (``nvmlDeviceGetPowerUsage``, milliwatts); for them a
  background thread samples it and integrates with the trapezoid rule.
- Linux exposes Intel/AMD RAPL package counters under /sys/class/powercap (``energy_uj``, microjoules,
  wrapping at ``max_energy_range_uj``). Only top-level package domains are summed: their subzones
  (core, uncore, dram) are parts of the package's figure and would be counted twice. The counters are
  machine-wide, so on a shared node they include other tenants' work; the source name says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

POWERCAP = Path("/sys/class/powercap")
SAMPLE_SECONDS = 0.1  # power sampling period where no energy counter exists (NVML updates ~every 20-100 ms)


class EnergyReader(Protocol):
    source: str
    """Where the figure comes from, e.g. "nvml-energy-counter", "nvml-power-sampling", "rapl"."""

    def start(self) -> None: ...

    def joules(self) -> float:
        """Energy since start()."""
        ...

    def close(self) -> None: ...


@dataclass
class _RaplZone:
    counter: Path
    wrap: int
    last: int = 0
    total: int = 0

    def read(self) -> int:
        return int(self.counter.read_text().strip())

    def reset(self) -> None:
        self.last, self.total = self.read(), 0

    def advance(self) -> int:
        now = self.read()
        # A counter that went backwards wrapped once (reads are far more frequent than the ~minutes a
        # wrap takes at package power).
        self.total += now - self.last if now >= self.last else self.wrap - self.last + now
        self.last = now
        return self.total


class RaplReader:
    source = "rapl"

    def __init__(self, zones: list[_RaplZone]) -> None:
        self._zones = zones

    @classmethod
    def discover(cls, root: Path = POWERCAP) -> RaplReader | None:
        """Readable package zones (intel-rapl:N, not intel-rapl:N:M); None when there are none."""
        zones = []
        for zone in sorted(root.glob("intel-rapl:*")):
            if zone.name.count(":") != 1:
                continue
            counter, wrap = zone / "energy_uj", zone / "max_energy_range_uj"
            try:
                z = _RaplZone(counter, int(wrap.read_text().strip()))
                z.read()
            except (OSError, ValueError):  # since Linux 5.10 energy_uj is root-only (PLATYPUS, CVE-2020-8694)
                continue
            zones.append(z)
        return cls(zones) if zones else None

    def start(self) -> None:
        for z in self._zones:
            z.reset()

    def joules(self) -> float:
        return sum(z.advance() for z in self._zones) / 1e6

    def close(self) -> None:
        pass


@dataclass
class _PowerIntegral:
    """Trapezoid integral of power samples taken by a daemon thread."""

    read_watts: Callable[[], float]
    period: float = SAMPLE_SECONDS
    clock: Callable[[], float] = time.monotonic
    _joules: float = 0.0
    _last: tuple[float, float] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        now, watts = self.clock(), self.read_watts()
        with self._lock:
            if self._last is not None:
                then, before = self._last
                self._joules += (now - then) * (watts + before) / 2
            self._last = (now, watts)

    def start(self, thread: bool = True) -> None:
        self._joules, self._last = 0.0, None
        self.sample()
        if thread:
            self._thread = threading.Thread(target=self._run, name="power-sampler", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def joules(self) -> float:
        self.sample()
        with self._lock:
            return self._joules

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.period + 1)


class NvmlReader:
    """One process's GPUs (by default the CUDA device of this rank)."""

    def __init__(
        self,
        nvml: Any,
        handles: list[Any],
        sample_thread: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nvml = nvml
        self._clock = clock
        self._handles = handles
        self._sample_thread = sample_thread
        self._start_mj: list[int] = []
        self._integral: _PowerIntegral | None = None
        self.source = (
            "nvml-energy-counter" if all(self._has_counter(h) for h in handles) else "nvml-power-sampling"
        )

    def _has_counter(self, handle: Any) -> bool:
        try:
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except self._nvml.NVMLError:  # NVML_ERROR_NOT_SUPPORTED before Volta
            return False
        return True

    @classmethod
    def discover(cls, device_indices: list[int]) -> NvmlReader | None:
        try:
            import pynvml  # nvidia-ml-py, NVIDIA's own bindings
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in device_indices]
        except pynvml.NVMLError:  # no driver in this container
            return None
        return cls(pynvml, handles) if handles else None

    def _watts(self) -> float:
        return float(sum(self._nvml.nvmlDeviceGetPowerUsage(h) for h in self._handles)) / 1000

    def start(self) -> None:
        if self.source == "nvml-energy-counter":
            self._start_mj = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
        else:
            self._integral = _PowerIntegral(self._watts, clock=self._clock)
            self._integral.start(thread=self._sample_thread)

    def joules(self) -> float:
        if self._integral is not None:
            return self._integral.joules()
        now = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
        return float(sum(b - a for a, b in zip(self._start_mj, now, strict=True))) / 1000

    def close(self) -> None:
        if self._integral is not None:
            self._integral.close()


def discover(cuda_devices: list[int] | None = None, powercap: Path = POWERCAP) -> EnergyReader | None:
    """NVML for the given CUDA devices when there are any, else RAPL when readable, else None."""
    if cuda_devices:
        return NvmlReader.discover(cuda_devices)
    return RaplReader.discover(powercap)


def joules_per_token(joules: float | None, tokens: int) -> float | None:
    return joules / tokens if joules is not None and tokens > 0 else None


def kwh(joules: float | None) -> float | None:
    return joules / 3.6e6 if joules is not None else None
