"""`llmop logs JOB [-n NS]`: the container logs the development runtime wrote for one job.

Reads the files directly (no apiserver needed), so logs outlive the pods and the job.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from llmop_dev.runtime import paths


def job_log_files(job: str, namespace: str) -> list[Path]:
    """Preparation pods first (creation order), then worker 0, 1, ..."""
    base = paths.root() / "logs" / namespace
    if not base.is_dir():
        return []
    prepare = re.compile(rf"{re.escape(job)}-prepare-[a-z0-9]+")
    worker = re.compile(rf"{re.escape(job)}-worker-(\d+)")
    pods = [d for d in base.iterdir() if d.is_dir()]
    preps = sorted((d for d in pods if prepare.fullmatch(d.name)), key=lambda d: d.stat().st_mtime)
    workers = sorted(
        (d for d in pods if worker.fullmatch(d.name)), key=lambda d: int(d.name.rsplit("-", 1)[1])
    )
    return [f for d in [*preps, *workers] for f in sorted(d.glob("*.log"))]


def main(job: str, namespace: str, tail: int | None = None) -> int:
    files = job_log_files(job, namespace)
    if not files:
        print(f"no logs of job {job} in namespace {namespace} under {paths.root() / 'logs'}", file=sys.stderr)
        return 1
    for f in files:
        lines = f.read_text(errors="replace").splitlines()
        print(f"--- {f.parent.name}/{f.stem} ({f}) ---")
        print("\n".join(lines[-tail:] if tail else lines))
    return 0
