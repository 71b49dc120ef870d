"""The shared work directory of distributed prepare: one output directory and one marker per
(phase, index), written so that a pod killed at any point leaves nothing a rerun could mistake.

    <data_dir>/.prepare-work/<phase>/<index>/            the outputs, renamed into place when complete
    <data_dir>/.prepare-work/<phase>/<index>.tmp-<pid>/  while being written (removed by a rerun)
    <data_dir>/.prepare-work/<phase>/<index>.done.json   the marker: fingerprint and statistics

A marker counts only under the same fingerprint (config hash and pod count, since the hash
partitions depend on N); outputs without a matching marker are removed before the pod redoes them,
and a reader refuses another pod's outputs without one, so two configurations are never mixed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from llmop_contract.api.v1alpha1.data import PreparePhase

WORK_DIR = ".prepare-work"


class PhaseOrderError(RuntimeError):
    """A phase found an earlier phase's output missing: the operator's ordering was not kept (a
    crash, so the pod is retried, never a refusal)."""


class Work:
    def __init__(self, data_dir: Path, fingerprint: str) -> None:
        self.root = data_dir / WORK_DIR
        self.fingerprint = fingerprint

    def out(self, phase: PreparePhase, index: int) -> Path:
        return self.root / phase.value / str(index)

    def marker_path(self, phase: PreparePhase, index: int) -> Path:
        return self.root / phase.value / f"{index}.done.json"

    def marker(self, phase: PreparePhase, index: int) -> dict[str, Any] | None:
        """The stats of a finished (phase, index) under this fingerprint, else None."""
        try:
            done = json.loads(self.marker_path(phase, index).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(done, dict) or done.get("fingerprint") != self.fingerprint:
            return None
        stats = done.get("stats")
        return stats if isinstance(stats, dict) else None

    def require(self, phase: PreparePhase, index: int) -> dict[str, Any]:
        stats = self.marker(phase, index)
        if stats is None:
            raise PhaseOrderError(f"{phase.value} pod {index} has not finished under this configuration")
        return stats

    def begin(self, phase: PreparePhase, index: int) -> Path:
        """A fresh staging directory; whatever an earlier attempt left for this index is removed."""
        parent = self.root / phase.value
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f"{index}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.marker_path(phase, index).unlink(missing_ok=True)
        shutil.rmtree(self.out(phase, index), ignore_errors=True)
        staging = parent / f"{index}.tmp-{os.getpid()}"
        staging.mkdir()
        return staging

    def finish(self, phase: PreparePhase, index: int, staging: Path, stats: dict[str, Any]) -> None:
        """Renames the outputs into place, then writes the marker (itself via a renamed temporary)."""
        os.replace(staging, self.out(phase, index))
        path = self.marker_path(phase, index)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "stats": stats}, sort_keys=True))
        os.replace(tmp, path)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
