"""Is the tokenised data there, intact and large enough for the job? Checked before any model is built.

Pure Python (no torch, no numpy): ``llmtrain train`` runs it before the launcher starts torchrun and
``llmtrain compress`` before loading a model, so data that cannot work exits 2 with one line naming
the cause in well under a second instead of every rank crashing (and the operator retrying) later.

The arithmetic is the trainer's (llmtrain/train/data.py): a window is ``sequenceLength + 1`` tokens
(inputs plus the shifted targets), windows do not overlap, training needs at least one global
micro-batch (``microBatchSize x processes`` windows) of the train split and evaluation one window of
the val split. Supervised data packed the same way counts windows too; padded, a row is one record, so
records are counted instead (each shard records how many start in it).
"""

from __future__ import annotations

import json
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


def require_records(split: str, records: int, needed: int, why: str) -> None:
    """DataError unless a padded split holds ``needed`` records (one per row)."""
    if records >= needed:
        return
    raise DataError(
        f"{split} split has {records} records, fewer than the {needed} that {why} needs "
        "(packing Padded: one record per row)"
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
        if manifest.supervised:
            _check_flags(Path(data_dir), shard.file, shard.flags_file, shard.tokens)


def _check_flags(data_dir: Path, file: str, flags_file: str | None, tokens: int) -> None:
    if flags_file is None:
        raise DataError(f"{data_dir / file}: supervised data, but {MANIFEST_FILE} lists no flags for it")
    path = data_dir / flags_file
    try:
        size = os.stat(path).st_size
    except OSError:
        raise DataError(f"{path}: the flags of {file} are missing") from None
    if size != tokens:
        raise DataError(f"{path}: {size} flags for the {tokens} tokens of {file}")


def check_split(
    data_dir: str | Path, manifest: DataManifest, split: str, sequence_length: int, needed: int, why: str
) -> None:
    check_shards(data_dir, manifest, split)
    if manifest.packing == "Padded":
        require_records(split, manifest.records(split), needed, why)
    else:
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
    if cfg.spec.model.pretrained is not None:
        check_pretrained_vocab(cfg, manifest)
    elif manifest.vocab_size > cfg.spec.model.scratch().vocab_size:
        raise DataError(
            "spec.model.vocabSize",
            f"the data's vocabulary ({manifest.vocab_size}) exceeds it ({cfg.spec.model.scratch().vocab_size})",
        )
    if cfg.spec.data.format.type.value != manifest.record_format:
        raise DataError(
            "spec.data.format.type",
            f"is {cfg.spec.data.format.type.value}, but the data in {cfg.paths.data_dir} was prepared as "
            f"{manifest.record_format} (run prepare again)",
        )
    seq = cfg.spec.training.sequence_length
    for split, (needed, why) in training_needs(cfg).items():
        check_split(cfg.paths.data_dir, manifest, split, seq, needed, why)
    return manifest


def check_pretrained_vocab(cfg: TrainerConfig, manifest: DataManifest) -> None:
    """The data's token ids must fit the pretrained model's embedding table (config.json vocab_size)."""
    from llmtrain import sources

    try:
        config = json.loads((sources.resolve_model(cfg) / "config.json").read_text())
    except (OSError, ValueError):
        return  # not ours to report: loading the model names what is wrong with it
    rows = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if isinstance(rows, int) and manifest.vocab_size > rows:
        raise DataError(
            sources.MODEL_FIELD,
            f"the data was tokenised with {manifest.vocab_size} tokens, more than the model's "
            f"{rows} embedding rows: prepare it with this model's tokenizer",
        )
