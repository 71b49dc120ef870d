"""Energy readers fed by recorded counter values: RAPL sysfs trees and NVML answers, wraps included."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmtrain import energy


def _zone(root: Path, name: str, values: list[int], wrap: int) -> Iterator[None]:
    """A powercap zone whose energy_uj takes the next recorded value at each step of the iterator."""
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "max_energy_range_uj").write_text(f"{wrap}\n")
    for v in values:
        (zone / "energy_uj").write_text(f"{v}\n")
        yield


def test_rapl_sums_packages_skips_subzones_and_unwraps(tmp_path: Path) -> None:
    wrap = 262143328850  # a real max_energy_range_uj (Skylake-SP package)
    # Package 0 wraps between the second and third reading; package 1 is steady; the core subzone
    # (part of package 0's figure) would double-count if summed.
    pkg0 = _zone(tmp_path, "intel-rapl:0", [wrap - 5_000_000, wrap - 1_000_000, 2_000_000], wrap)
    pkg1 = _zone(tmp_path, "intel-rapl:1", [10_000_000, 13_000_000, 16_000_000], wrap)
    core = _zone(tmp_path, "intel-rapl:0:0", [0, 999_000_000, 1_999_000_000], wrap)
    steps = [pkg0, pkg1, core]
    for s in steps:
        next(s)
    reader = energy.RaplReader.discover(tmp_path)
    assert reader is not None and reader.source == "rapl"
    reader.start()
    for s in steps:
        next(s)
    assert reader.joules() == pytest.approx(4.0 + 3.0)
    for s in steps:
        next(s)
    # 4 J before the wrap, then 1 J up to the wrap and 2 J after it; package 1 another 3 J.
    assert reader.joules() == pytest.approx((4 + 1 + 2) + (3 + 3))


def test_rapl_unreadable_or_absent_is_unavailable(tmp_path: Path) -> None:
    assert energy.RaplReader.discover(tmp_path / "missing") is None
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "max_energy_range_uj").write_text("100\n")
    # A counter the process cannot read (root-only since Linux 5.10 gives PermissionError; any OSError
    # counts the same): here a directory where the file should be, which fails for root too.
    (zone / "energy_uj").mkdir()
    assert energy.discover(powercap=tmp_path) is None


class _NVMLError(Exception):
    pass


class _RecordedNvml:
    """NVML's calls answering recorded values in order (mJ for energy, mW for power)."""

    NVMLError = _NVMLError

    def __init__(self, energy_mj: list[int] | None, power_mw: list[int]) -> None:
        self._energy = list(energy_mj) if energy_mj is not None else None
        self._power = list(power_mw)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        if self._energy is None:
            raise _NVMLError("Not Supported")
        return self._energy.pop(0)

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._power.pop(0)


def test_nvml_energy_counter_difference() -> None:
    # Recorded on an H100 SXM: counter in mJ since driver load; first value is the probe.
    nvml = _RecordedNvml([981_250_113, 981_250_113, 981_950_620, 983_401_007], [])
    reader = energy.NvmlReader(nvml, handles=["gpu0"])
    assert reader.source == "nvml-energy-counter"
    reader.start()
    assert reader.joules() == pytest.approx(700.507)
    assert reader.joules() == pytest.approx(2150.894)


def test_nvml_power_sampling_integrates_trapezoids() -> None:
    nvml = _RecordedNvml(None, [100_000, 300_000, 300_000])
    clock = iter([0.0, 2.0, 3.0])
    reader = energy.NvmlReader(nvml, handles=["gpu0"], sample_thread=False, clock=lambda: next(clock))
    assert reader.source == "nvml-power-sampling"
    reader.start()
    # 0-2 s ramps 100 W -> 300 W (400 J), 2-3 s at 300 W (300 J).
    assert reader.joules() == pytest.approx(400.0)
    assert reader.joules() == pytest.approx(700.0)


def test_no_nvml_on_a_gpu_rank_is_unavailable_not_rapl(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_pynvml(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pynvml":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    assert energy.discover(cuda_devices=[0]) is None


def test_derived_figures() -> None:
    assert energy.joules_per_token(720.0, 1200) == pytest.approx(0.6)
    assert energy.kwh(3.6e6) == pytest.approx(1.0)
    assert energy.joules_per_token(None, 10) is None and energy.kwh(None) is None


class _Counter:
    def __init__(self) -> None:
        self.started = self.closed = False

    def start(self) -> None:
        self.started = True

    def joules(self) -> float:
        return 812.5

    def close(self) -> None:
        self.closed = True


def test_a_compression_stage_reports_its_energy_on_its_own_device_or_says_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from llmtrain.compress.run import StageEnergy

    asked: list[list[int] | None] = []
    counter = _Counter()

    def discover(cuda: list[int] | None = None) -> _Counter:
        asked.append(cuda)
        return counter

    monkeypatch.setattr(energy, "discover", discover)
    meter = StageEnergy.start(torch.device("cuda", 1))
    assert asked == [[1]] and counter.started  # NVML for the GPU the stage ran on
    assert meter.results() == {"energyMeasured": 1.0, "energyJoules": 812.5} and counter.closed
    StageEnergy.start(torch.device("cpu"))
    assert asked[-1] is None  # RAPL on the CPU
    monkeypatch.setattr(energy, "discover", lambda cuda=None: None)
    assert StageEnergy.start(torch.device("cpu")).results() == {"energyMeasured": 0.0}  # never invented


def test_serving_metrics_report_measured_energy_per_generated_token(tmp_path: Path) -> None:
    """The serving process's series, fed by a recorded RAPL package counter."""
    from prometheus_client import generate_latest

    from llmtrain.serve.metrics import ServingMetrics

    wrap = 262143328850
    pkg = _zone(tmp_path, "intel-rapl:0", [1_000_000, 31_000_000, 91_000_000], wrap)
    next(pkg)
    metrics = ServingMetrics()
    metrics.measure_energy(energy.RaplReader.discover(tmp_path))
    assert metrics.energy_summary()["energy_measured"] is True
    next(pkg)  # 30 J while 60 tokens are generated
    metrics.tokens_generated(60)
    text = generate_latest(metrics.registry).decode()
    assert "llmserve_energy_available 1.0" in text
    assert "llmserve_energy_joules 30.0" in text
    assert "llmserve_energy_joules_per_generated_token 0.5" in text
    next(pkg)  # 60 J more, idle: the tokens served cost more each
    summary = metrics.energy_summary()
    assert summary == {
        "energy_measured": True,
        "source": "rapl",
        "joules": 90.0,
        "generated_tokens": 60,
        "joules_per_token": 1.5,
    }


def test_serving_metrics_without_a_counter_say_unavailable() -> None:
    from prometheus_client import generate_latest

    from llmtrain.serve.metrics import ServingMetrics

    metrics = ServingMetrics()
    metrics.measure_energy(None)
    metrics.tokens_generated(10)
    text = generate_latest(metrics.registry).decode()
    assert "llmserve_energy_available 0.0" in text
    assert "llmserve_energy_joules" not in text
    assert metrics.energy_summary() == {"energy_measured": False}
