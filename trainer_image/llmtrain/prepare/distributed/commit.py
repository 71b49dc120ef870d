"""commit, one pod: one DataManifest over every write pod's shards, in pod order.

The shards are hard-linked (copied where the volume cannot link) into pipeline's staging directory,
so a commit killed halfway leaves the write pods' outputs intact for its rerun; then pipeline's own
commit moves them into the data directory with the tokenizer files and the report, the manifest
last. The work directory is removed afterwards: from then on the manifest's config hash is what
makes every phase a no-op.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from llmop_contract.api.v1alpha1.data import PreparePhase
from llmop_contract.protocol import Shard
from llmtrain.config import DataError
from llmtrain.prepare import pipeline
from llmtrain.prepare.distributed import cluster, write
from llmtrain.prepare.distributed.common import Context
from llmtrain.prepare.stages import Report

log = logging.getLogger("llmtrain.prepare")


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _stats(ctx: Context) -> tuple[dict[str, Any], dict[str, float]]:
    """The single pod's statistics, summed over the phases' markers, and the seconds per phase
    (the slowest pod of each: the phases' critical path)."""
    work, n = ctx.work, ctx.pods
    scans = [work.require(PreparePhase.SCAN, p) for p in range(n)]
    dedups = [work.require(PreparePhase.DEDUP, p) for p in range(n)]
    clustered = work.require(PreparePhase.CLUSTER, 0)
    writes = [work.require(PreparePhase.WRITE, p) for p in range(n)]
    per_source: collections.Counter[str] = collections.Counter()
    reader: collections.Counter[str] = collections.Counter()
    removed: collections.Counter[str] = collections.Counter()
    edits: collections.Counter[str] = collections.Counter()
    for s in scans:
        for k, v in s["per_source"].items():
            per_source[ctx.sources[int(k)].source.uri] += v
        reader.update(s["reader"])
        removed.update(s["removed"])
        edits.update(s["edits"])
    documents_in = sum(s["documents_read"] for s in scans)
    cleaned = sum(s["documents_kept"] for s in scans)
    by_rule = dict(removed)
    by_rule["exact_duplicate"] = clustered["exact_duplicates"]
    by_rule["near_duplicate"] = clustered["near_duplicates"].get("removed", 0)
    stats: dict[str, Any] = {
        "skipped": False,
        "workers": 1,
        "distributed": {"pods": n},
        "documents_in": documents_in,
        "sources": dict(per_source),
        "reader": dict(reader),
        "input_bytes": sum(s["input_bytes"] for s in scans),
        "cleaning": {"removed": dict(removed), "edits": dict(edits), "documents_out": cleaned},
        "exact_duplicates": clustered["exact_duplicates"],
        "near_duplicates": clustered["near_duplicates"],
        "removed_by_rule": by_rule,
        "augmented_documents": sum(w["augmented_documents"] for w in writes),
        "documents_out": {
            split: sum(w["documents_out"][split] for w in writes)
            + (sum(w["augmented_documents"] for w in writes) if split == "train" else 0)
            for split in ("train", "val")
        },
    }
    seconds = {
        "scan": max(s["seconds"] for s in scans),
        "dedup": max(d["seconds"] for d in dedups),
        "cluster": clustered["seconds"],
        "write": max(w["seconds"] for w in writes),
    }
    return stats, seconds


def run(ctx: Context, index: int) -> dict[str, Any]:
    start = time.monotonic()
    config = ctx.config
    stats, seconds = _stats(ctx)
    vocab = write.vocabulary(ctx)
    tmp = pipeline._staging(config)
    splits: dict[str, list[Shard]] = {"train": [], "val": []}
    for p in range(ctx.pods):
        done = ctx.work.require(PreparePhase.WRITE, p)
        for split, listed in done["shards"].items():
            for entry in listed:
                shard = Shard.model_validate(entry)
                _link(ctx.work.out(PreparePhase.WRITE, p) / shard.file, tmp / shard.file)
                splits[split].append(shard)
    shutil.copyfile(ctx.work.out(PreparePhase.CLUSTER, 0) / cluster.REPORT, tmp / pipeline.REPORT)
    vocab.save(tmp)
    try:
        pipeline.check_tokens(config, splits)
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = Report(stats, seconds=dict(seconds))
    # _finish times the stage from t_start: start it the phases' critical path earlier.
    result = pipeline._finish(
        config, report, start - sum(seconds.values()), tmp, splits, vocab, ctx.config_hash
    )
    ctx.work.remove()
    result["results"] = {
        "documentsRead": stats["documents_in"],
        "documentsKept": stats["documents_out"]["train"] + stats["documents_out"]["val"],
        "tokens": sum(result["tokens"].values()),
        "shards": sum(result["shards"].values()),
    }
    return result
