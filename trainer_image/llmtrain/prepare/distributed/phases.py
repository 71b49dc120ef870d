"""One (phase, index) of distributed prepare: the checks every phase shares, then the phase itself.

Every phase first runs the single pod's preflight (so a bad config or a missing source is refused
from any phase, exit 2), then exits at once when the manifest is already up to date or when this
(phase, index) has its marker under the same fingerprint.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmop_contract.api.v1alpha1.data import PreparePhase
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.protocol import MANIFEST_FILE
from llmtrain.config import ConfigError
from llmtrain.prepare import pipeline
from llmtrain.prepare.distributed import cluster, commit, partition, scan, write
from llmtrain.prepare.distributed.common import Context, terminate
from llmtrain.prepare.distributed.work import Work
from llmtrain.prepare.fingerprint import config_hash, tokenizer_identity

log = logging.getLogger("llmtrain.prepare")
INDEX_ENV = "JOB_COMPLETION_INDEX"

_RUN: dict[PreparePhase, Callable[[Context, int], dict[str, Any]]] = {
    PreparePhase.SCAN: scan.run,
    PreparePhase.DEDUP: partition.run,
    PreparePhase.CLUSTER: cluster.run,
    PreparePhase.WRITE: write.run,
    PreparePhase.COMMIT: commit.run,
}


def pod_index(explicit: int | None) -> int:
    """--index, else the Indexed Job's JOB_COMPLETION_INDEX, else 0."""
    if explicit is not None:
        return explicit
    raw = os.environ.get(INDEX_ENV, "0")
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(INDEX_ENV, f"not an integer: {raw!r}") from exc


def pods(config: TrainerConfig) -> int:
    dist = config.spec.data.distributed
    return dist.pods if dist is not None else 1


def context(config: TrainerConfig) -> Context | dict[str, Any]:
    """The phase's context, or the statistics of an up-to-date manifest (nothing to do)."""
    data = config.spec.data
    sources = pipeline.preflight(config)
    if data.format.supervised:
        raise ConfigError(
            "spec.data.distributed", "distributed preparation is for plain-text corpora (format.type Text)"
        )
    data_dir = Path(config.paths.data_dir)
    chash = config_hash(config, sources, tokenizer_identity(config))
    if (existing := pipeline._up_to_date(data_dir, chash)) is not None:
        log.info("%s is up to date (config_hash %s); nothing to do", data_dir / MANIFEST_FILE, chash[:12])
        return {**existing.stats, "skipped": True}
    n = pods(config)
    return Context(config, sources, n, Work(data_dir, f"{chash}:{n}"), chash)


def run_phase(config: TrainerConfig, phase: PreparePhase, index: int) -> dict[str, Any]:
    """Runs (phase, index) unless done; writes the pod's termination message; returns its stats."""
    if not config.spec.data.prepare:
        return {"skipped": True, "reason": "spec.data.prepare is false"}
    count = pods(config) if phase.parallel else 1
    if not 0 <= index < count:
        raise ConfigError("--index", f"{phase.value} runs {count} pod(s); index {index} is out of range")
    start = time.monotonic()
    ctx = context(config)
    if isinstance(ctx, dict):
        stats = ctx
    elif (done := ctx.work.marker(phase, index)) is not None:
        log.info("prepare %s %d already done under this configuration; nothing to do", phase.value, index)
        stats = {**done, "skipped": True}
    else:
        stats = _RUN[phase](ctx, index)
        log.info("prepare %s %d done in %.1fs", phase.value, index, time.monotonic() - start)
    results = stats.get("results") or {
        "documentsRead": float(stats.get("documents_in", 0)),
        "documentsKept": float(sum(stats.get("documents_out", {}).values())),
    }
    terminate(phase.value, index, {k: float(v) for k, v in results.items()})
    return stats
