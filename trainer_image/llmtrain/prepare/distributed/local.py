"""Every phase of distributed prepare on this machine, each pod a ``python -m llmtrain.prepare
--phase P --index I`` subprocess (the parallel phases' pods at once), as the operator's Indexed
Jobs would run them; for tests and benchmarks. Each pod runs through ``measured``, which reports its
peak RSS (VmHWM) on its last stderr line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmop_contract.api.v1alpha1.data import Distribution, PreparePhase
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmtrain.prepare.distributed.measured import PEAK_PREFIX

ALL = tuple(PreparePhase)


@dataclass
class Pod:
    phase: PreparePhase
    index: int
    returncode: int
    stdout: str
    stderr: str
    peak_rss_bytes: int


class PodFailed(RuntimeError):
    def __init__(self, pod: Pod) -> None:
        super().__init__(f"{pod.phase.value} pod {pod.index} exited {pod.returncode}: {pod.stderr[-2000:]}")
        self.pod = pod


def _env() -> dict[str, str]:
    # The children import llmtrain from the same tree as this process, wherever it was found.
    roots = [str(Path(__file__).resolve().parents[3])]
    extra = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*roots, *([extra] if extra else [])])}


def write_config(config: TrainerConfig, pods: int, path: Path) -> Path:
    cfg = config.model_copy(deep=True)
    dist = cfg.spec.data.distributed or Distribution()
    cfg.spec.data.distributed = dist.model_copy(update={"pods": pods})
    # YAML, not JSON: load_config reads YAML 1.1, where JSON's 1e-08 would be a string.
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True, exclude_none=True)))
    return path


def run_phase(config_path: Path, phase: PreparePhase, count: int, timeout: float = 3600) -> list[Pod]:
    """The ``count`` pods of ``phase`` at once; raises PodFailed for the first that exits non-zero."""
    procs = []
    for i in range(count):
        cmd = [sys.executable, "-m", "llmtrain.prepare.distributed.measured", str(config_path)]
        cmd += ["--phase", phase.value, "--index", str(i)]
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        procs.append((i, subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=_env()), out, err))
    pods: list[Pod] = []
    for i, proc, out, err in procs:
        proc.wait(timeout=timeout)
        out.seek(0)
        err.seek(0)
        stderr = err.read()
        last = stderr.rstrip("\n").rpartition("\n")[2]
        peak = int(last.removeprefix(PEAK_PREFIX)) if last.startswith(PEAK_PREFIX) else 0
        pods.append(Pod(phase, i, proc.returncode, out.read(), stderr, peak))
        out.close()
        err.close()
    for pod in pods:
        if pod.returncode != 0:
            raise PodFailed(pod)
    return pods


def run_local(
    config: TrainerConfig, pods: int, phases: Sequence[PreparePhase] = ALL, config_dir: Path | None = None
) -> dict[str, Any]:
    """Runs ``phases`` in order with ``pods`` pods each parallel phase; returns the statistics the
    last phase's pod 0 printed (the commit's: the manifest's statistics)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_config(config, pods, Path(config_dir or tmp) / "prepare-config.yaml")
        last: list[Pod] = []
        for phase in phases:
            last = run_phase(path, phase, pods if phase.parallel else 1)
    stats: dict[str, Any] = json.loads(last[0].stdout) if last else {}
    return stats
