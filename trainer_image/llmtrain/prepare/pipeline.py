"""The prepare stage end to end: read, clean, deduplicate, split, augment, tokenise, shard, commit.

``run`` calls one function per named stage (the document stages are in ``stages``); ``Report.stage``
times each into the statistics' ``seconds``, which the manifest and the prepare command report.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmop_contract.api.v1alpha1.data import DataSpec
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.protocol import MANIFEST_FILE, DataManifest, Shard
from llmtrain import datacheck
from llmtrain.config import ConfigError, DataError
from llmtrain.prepare import readers, shards
from llmtrain.prepare import tokenizer as tok
from llmtrain.prepare.fingerprint import config_hash
from llmtrain.prepare.parallel import PROGRESS_SECONDS, workers
from llmtrain.prepare.stages import (
    Docs,
    Report,
    augment_documents,
    build_tokenizer,
    clean_documents,
    exact_dedup,
    near_dedup,
    read_sources,
)

log = logging.getLogger("llmtrain.prepare")
REPORT = "dedup_clusters.jsonl"
_ENCODE_BATCH = 1000


def preflight(config: TrainerConfig) -> list[readers.ResolvedSource]:
    """Every check that can fail on the configuration, before any document is read."""
    data = config.spec.data
    if not data.sources:
        raise ConfigError("spec.data.sources", "no sources to prepare")
    sources = [readers.resolve(i, s) for i, s in enumerate(data.sources)]
    if data.tokenizer.path:
        if not os.path.isfile(data.tokenizer.path):
            raise ConfigError("spec.data.tokenizer.path", f"{data.tokenizer.path!r} is not a file")
    elif config.spec.model.scratch().vocab_size < tok.MIN_VOCAB:
        raise ConfigError(
            "spec.model.vocabSize",
            f"a byte-level BPE needs at least {tok.MIN_VOCAB} tokens, got {config.spec.model.scratch().vocab_size}",
        )
    aug = data.augmentation
    if aug.enabled and aug.synonym_replacement and not os.path.isfile(aug.thesaurus_path or ""):
        raise ConfigError("spec.data.augmentation.thesaurusPath", f"{aug.thesaurus_path!r} is not a file")
    return sources


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) document indices, shuffled; val is never empty when there are two documents."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = round(n * fraction)
    if n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return order[n_val:], order[:n_val]


def _write_split(
    texts: Sequence[str], info: tok.TokenizerInfo, writer: shards.ShardWriter, label: str
) -> None:
    start = last = time.monotonic()
    eos = [info.eos_id]
    for lo in range(0, len(texts), _ENCODE_BATCH):
        # encode_batch runs on the tokenizers Rust thread pool, which uses every core.
        encodings = info.tokenizer.encode_batch(
            list(texts[lo : lo + _ENCODE_BATCH]), add_special_tokens=False
        )
        flat = itertools.chain.from_iterable(itertools.chain(e.ids, eos) for e in encodings)
        writer.add(np.fromiter(flat, dtype=np.int64))
        now = time.monotonic()
        if now - last >= PROGRESS_SECONDS:
            last = now
            done = min(lo + _ENCODE_BATCH, len(texts))
            log.info("tokenise %s: %d/%d docs, %.0f docs/s", label, done, len(texts), done / (now - start))


def write_shards(
    config: TrainerConfig, texts: dict[str, list[str]], info: tok.TokenizerInfo, report: Report
) -> tuple[Path, dict[str, list[Shard]]]:
    """Tokenises each split into shards in a fresh temporary directory next to the output, with the
    tokenizer files and the duplicate-cluster report; returns (that directory, the shards per split)."""
    data_dir = Path(config.paths.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob(".prepare-tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = data_dir / f".prepare-tmp-{os.getpid()}"
    tmp.mkdir()
    dtype = shards.dtype_for(config.spec.model.scratch().vocab_size)
    splits: dict[str, list[Shard]] = {}
    for split, split_texts in texts.items():
        writer = shards.ShardWriter(tmp, split, dtype, config.spec.data.sharding.tokens_per_shard)
        _write_split(split_texts, info, writer, split)
        splits[split] = writer.close()
    tok.save(info, tmp, config.spec.model.scratch().context_length)
    with open(tmp / REPORT, "w") as fh:
        for entry in report.clusters:
            fh.write(json.dumps(entry) + "\n")
    return tmp, splits


def _commit(tmp: Path, data_dir: Path, manifest: DataManifest) -> None:
    """Moves the finished files into place; the manifest goes last, so a crash at any point leaves
    either the old complete output, or no manifest at all (which the next run rebuilds)."""
    (data_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for split in shards.SPLITS:
        for old in data_dir.glob(f"{split}-*.bin"):
            old.unlink()
    for f in sorted(tmp.iterdir()):
        os.replace(f, data_dir / f.name)
    staged = data_dir / f".{MANIFEST_FILE}.tmp"
    with open(staged, "w") as fh:
        json.dump(manifest.model_dump(mode="json"), fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(staged, data_dir / MANIFEST_FILE)
    tmp.rmdir()
    dir_fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- the whole stage ------------------------------------------------------------------------------


def _up_to_date(data_dir: Path, chash: str) -> DataManifest | None:
    existing = shards.read_manifest(data_dir)
    if existing and existing.config_hash == chash and shards.shards_present(data_dir, existing):
        return existing
    return None


def _filter(docs: Docs, data: DataSpec, report: Report) -> Docs:
    """Clean, then drop exact and near duplicates; ConfigError when nothing survives."""
    with report.stage("clean"):
        docs = clean_documents(docs, data, report)
    with report.stage("exact_dedup"):
        docs = exact_dedup(docs, data, report)
    with report.stage("near_dedup"):
        docs = near_dedup(docs, data, report)
    removed = report.removed
    log.info(
        "cleaning removed %d, exact duplicates %d, near duplicates %d in %d clusters; %d documents left",
        sum(v for k, v in removed.items() if not k.endswith("_duplicate")),
        removed["exact_duplicate"],
        removed["near_duplicate"],
        report.stats["near_duplicates"].get("clusters", 0),
        len(docs.texts),
    )
    if not report.stats.get("documents_in"):
        raise DataError("spec.data.sources", "the sources hold no documents (0 read)")
    if not docs.texts:
        raise DataError("spec.data.cleaning", "no document survived cleaning and deduplication")
    if len(docs.texts) < 2:
        # One document cannot be split: the val split would be empty and training would crash on it.
        raise DataError(
            "spec.data.sources",
            f"only 1 of {report.stats['documents_in']} documents is left after cleaning and deduplication "
            f"({removed['exact_duplicate']} exact and {removed['near_duplicate']} near duplicates removed); "
            "at least 2 distinct documents are needed, one for the validation split",
        )
    return docs


def check_tokens(config: TrainerConfig, splits: dict[str, list[Shard]]) -> None:
    """DataError when the shards are too small for the job to train on (nothing is committed then)."""
    seq = config.spec.training.sequence_length
    for split, (needed, why) in datacheck.training_needs(config).items():
        tokens = sum(s.tokens for s in splits.get(split, []))
        datacheck.require_windows(split, tokens, seq, needed, why)


def run(config: TrainerConfig) -> dict[str, Any]:
    """Prepares ``config.paths.data_dir``; returns the statistics (``skipped`` when already up to date)."""
    data = config.spec.data
    if not data.prepare:
        log.info("spec.data.prepare is false; expecting shards already in %s", config.paths.data_dir)
        return {"skipped": True, "reason": "spec.data.prepare is false"}
    t_start = time.monotonic()
    sources = preflight(config)
    data_dir = Path(config.paths.data_dir)
    chash = config_hash(config, sources)
    if (existing := _up_to_date(data_dir, chash)) is not None:
        log.info("%s is up to date (config_hash %s); nothing to do", data_dir / MANIFEST_FILE, chash[:12])
        return {**existing.stats, "skipped": True}

    n_workers = workers(data.num_workers)
    # The tokenizers Rust pool reads this once, when it first starts; keep it to numWorkers too.
    os.environ.setdefault("RAYON_NUM_THREADS", str(n_workers))
    report = Report({"skipped": False, "workers": n_workers})
    with report.stage("read"):
        docs = read_sources(sources, report)
    texts = _filter(docs, data, report).texts
    train_idx, val_idx = split_indices(len(texts), data.sharding.validation_fraction, data.sharding.seed)
    train_texts, val_texts = [texts[i] for i in train_idx], [texts[i] for i in val_idx]
    with report.stage("augment"):
        augmented = augment_documents(train_texts, data, report)
    with report.stage("tokenizer"):
        info = build_tokenizer(config, train_texts)
    if augmented:
        train_texts = train_texts + augmented
        random.Random(data.sharding.seed + 1).shuffle(train_texts)
    report.stats["documents_out"] = {"train": len(train_texts), "val": len(val_texts)}
    with report.stage("tokenise_and_write"):
        tmp, splits = write_shards(config, {"train": train_texts, "val": val_texts}, info, report)
    try:
        check_tokens(config, splits)
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(config, report, t_start, tmp, splits, info, chash)


def _finish(
    config: TrainerConfig,
    report: Report,
    t_start: float,
    tmp: Path,
    splits: dict[str, list[Shard]],
    info: tok.TokenizerInfo,
    chash: str,
) -> dict[str, Any]:
    """Completes the statistics and commits the output with its manifest."""
    seconds, stats = report.seconds, report.stats
    seconds["total"] = time.monotonic() - t_start
    tokens = {split: sum(s.tokens for s in listed) for split, listed in splits.items()}
    stats["tokens"] = tokens
    stats["shards"] = {k: len(v) for k, v in splits.items()}
    stats["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    stats["docs_per_second"] = round(stats["documents_in"] / max(seconds["total"], 1e-9), 1)
    data_dir = Path(config.paths.data_dir)
    manifest = DataManifest(
        dtype=shards.dtype_for(config.spec.model.scratch().vocab_size).name,
        vocab_size=config.spec.model.scratch().vocab_size,
        eos_id=info.eos_id,
        pad_id=info.pad_id,
        splits=splits,
        stats=stats,
        config_hash=chash,
    )
    _commit(tmp, data_dir, manifest)
    log.info(
        "wrote %s: train %d tokens in %d shards, val %d tokens in %d shards (%.1fs)",
        data_dir / MANIFEST_FILE,
        tokens["train"],
        len(splits["train"]),
        tokens["val"],
        len(splits["val"]),
        seconds["total"],
    )
    return stats
