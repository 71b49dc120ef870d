"""Is the tokenised data there, intact and large enough for the job? Checked before any model is built.

Pure Python (no torch, no numpy): ``llmtrain train`` runs it before the launcher starts torchrun and
``llmtrain compress`` before loading a model, so data that cannot work exits 2 with one line naming
the cause in well under a second instead of every rank crashing (and the operator retrying) later.

The arithmetic is the trainer's (llmtrain/train/data.py): a window is ``sequenceLength + 1`` tokens
(inputs plus the shifted targets), windows do not overlap, training needs at least one global
micro-batch (``microBatchSize x processes`` windows) of the train split and evaluation one window of
the val split.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.protocol import MANIFEST_FILE, SHARD_FORMAT, DataManifest
from llmtrain.config import DataError

ITEMSIZE = {"uint16": 2, "uint32": 4}


def read_manifest(data_dir: str | Path) -> DataManifest:
    """``<data_dir>/manifest.json``, or DataError naming what is wrong with it."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(
            "paths.dataDir", f"{path} not found: run `llmtrain prepare` first (or set data.prepare)"
        )
    try:
        return DataManifest.model_validate_json(path.read_text())
    except (OSError, ValidationError) as exc:
        detail = str(exc).splitlines()[0]
        raise DataError(
            "paths.dataDir", f"{path}: expected format {SHARD_FORMAT} with dtype uint16/uint32 ({detail})"
        ) from exc


def windows(tokens: int, sequence_length: int) -> int:
    """Non-overlapping training windows of ``sequence_length + 1`` tokens in a split of ``tokens``."""
    return max(tokens - 1, 0) // sequence_length


def require_windows(split: str, tokens: int, sequence_length: int, needed: int, why: str) -> None:
    """DataError unless a split of ``tokens`` holds ``needed`` windows (``why`` says who needs them)."""
    if windows(tokens, sequence_length) >= needed:
        return
    need_tokens = needed * sequence_length + 1
    raise DataError(
        f"{split} split has {tokens} tokens, fewer than the {need_tokens} that {why} needs "
        f"({needed} window(s) of sequenceLength {sequence_length} + 1)"
    )


def check_shards(data_dir: str | Path, manifest: DataManifest, split: str) -> None:
    """Every shard the manifest lists for ``split`` exists with the size it records (a stat, no read)."""
    for shard in manifest.splits.get(split, []):
        path = Path(data_dir) / shard.file
        expected = shard.tokens * ITEMSIZE[manifest.dtype]
        try:
            size = os.stat(path).st_size
        except OSError:
            raise DataError(f"{path}: listed in {MANIFEST_FILE} but missing") from None
        if size != expected:
            raise DataError(
                f"{path}: {size} bytes, but {MANIFEST_FILE} records {shard.tokens} tokens ({expected} bytes)"
            )


def check_split(
    data_dir: str | Path, manifest: DataManifest, split: str, sequence_length: int, needed: int, why: str
) -> None:
    check_shards(data_dir, manifest, split)
    require_windows(split, manifest.tokens(split), sequence_length, needed, why)


def training_needs(cfg: TrainerConfig) -> dict[str, tuple[int, str]]:
    """Windows each split must hold for training with ``cfg``, and who needs them."""
    tr, workers = cfg.spec.training, cfg.spec.workers
    processes = workers.num_nodes * workers.procs_per_node
    return {
        "train": (
            tr.micro_batch_size * processes,
            f"one global micro-batch (microBatchSize {tr.micro_batch_size} x {processes} processes)",
        ),
        "val": (1, "validation"),
    }


def check_training_data(cfg: TrainerConfig) -> DataManifest:
    """The manifest of cfg.paths.dataDir when training can start on it, else DataError."""
    manifest = read_manifest(cfg.paths.data_dir)
    if manifest.vocab_size > cfg.spec.model.scratch().vocab_size:
        raise DataError(
            "spec.model.vocabSize",
            f"the data's vocabulary ({manifest.vocab_size}) exceeds it ({cfg.spec.model.scratch().vocab_size})",
        )
    seq = cfg.spec.training.sequence_length
    for split, (needed, why) in training_needs(cfg).items():
        check_split(cfg.paths.data_dir, manifest, split, seq, needed, why)
    return manifest
