"""The prepare stage end to end: read, clean, deduplicate, split, augment, tokenise, shard, commit.

Supervised formats (PromptCompletion, Chat, Template) take the records path instead: read records,
validate and render them (``records``), drop exact duplicates, split, tokenise with the pretrained
model's tokenizer into shards with loss/record-start flags, commit.

``run`` calls one function per named stage (the document stages are in ``stages``); ``Report.stage``
times each into the statistics' ``seconds``, which the manifest and the prepare command report.
"""

from __future__ import annotations

import collections
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
from llmop_contract.protocol import LOSS_FLAG, MANIFEST_FILE, DataManifest, Shard
from llmtrain import datacheck
from llmtrain.config import ConfigError, DataError
from llmtrain.prepare import readers, records, shards
from llmtrain.prepare import tokenizer as tok
from llmtrain.prepare.fingerprint import config_hash, tokenizer_identity
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
    store = config.spec.storage.object_store
    sources = [readers.resolve(i, s, store) for i, s in enumerate(data.sources)]
    if data.format.supervised and config.spec.model.pretrained is None:
        # Admission refuses this too; a config file written by hand reaches here.
        raise ConfigError(
            "spec.data.format.type",
            f"{data.format.type.value} records need model.pretrained: their prompts and answers are "
            "tokenised with that model's tokenizer",
        )
    if config.spec.model.pretrained is not None:
        pass  # the tokenizer is the model's; sources.resolve_tokenizer checks it is there
    elif data.tokenizer.path:
        if not os.path.isfile(data.tokenizer.path):
            raise ConfigError("spec.data.tokenizer.path", f"{data.tokenizer.path!r} is not a file")
    elif (vocab_size := config.spec.model.eff("vocab_size")) < tok.MIN_VOCAB:
        # eff, not scratch(): scratch() re-validates and would raise pydantic's error instead of this one.
        raise ConfigError(
            "spec.model.vocabSize",
            f"a byte-level BPE needs at least {tok.MIN_VOCAB} tokens, got {vocab_size}",
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


def _write_split(texts: Sequence[str], vocab: tok.Vocabulary, writer: shards.ShardWriter, label: str) -> None:
    start = last = time.monotonic()
    eos = [vocab.eos_id]
    for lo in range(0, len(texts), _ENCODE_BATCH):
        encodings = vocab.encode_batch(list(texts[lo : lo + _ENCODE_BATCH]))
        flat = itertools.chain.from_iterable(itertools.chain(ids, eos) for ids in encodings)
        writer.add(np.fromiter(flat, dtype=np.int64))
        now = time.monotonic()
        if now - last >= PROGRESS_SECONDS:
            last = now
            done = min(lo + _ENCODE_BATCH, len(texts))
            log.info("tokenise %s: %d/%d docs, %.0f docs/s", label, done, len(texts), done / (now - start))


def manifest_vocab_size(config: TrainerConfig, vocab: tok.Vocabulary) -> int:
    """The embedding rows the ids need: model.vocabSize from scratch, the tokenizer's own size else."""
    return (
        vocab.vocab_size
        if config.spec.model.pretrained is not None
        else config.spec.model.scratch().vocab_size
    )


def _staging(config: TrainerConfig) -> Path:
    """A fresh temporary directory next to the output (left-overs of a crashed run removed)."""
    data_dir = Path(config.paths.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob(".prepare-tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = data_dir / f".prepare-tmp-{os.getpid()}"
    tmp.mkdir()
    return tmp


def _write_extras(tmp: Path, vocab: tok.Vocabulary, report: Report) -> None:
    vocab.save(tmp)
    with open(tmp / REPORT, "w") as fh:
        for entry in report.clusters:
            fh.write(json.dumps(entry) + "\n")


def write_shards(
    config: TrainerConfig, texts: dict[str, list[str]], vocab: tok.Vocabulary, report: Report
) -> tuple[Path, dict[str, list[Shard]]]:
    """Tokenises each split into shards in a fresh temporary directory next to the output, with the
    tokenizer files and the duplicate-cluster report; returns (that directory, the shards per split)."""
    tmp = _staging(config)
    dtype = shards.dtype_for(manifest_vocab_size(config, vocab))
    splits: dict[str, list[Shard]] = {}
    for split, split_texts in texts.items():
        writer = shards.ShardWriter(tmp, split, dtype, config.spec.data.sharding.tokens_per_shard)
        _write_split(split_texts, vocab, writer, split)
        splits[split] = writer.close()
    _write_extras(tmp, vocab, report)
    return tmp, splits


def write_record_shards(
    config: TrainerConfig, encoded: dict[str, records.Encoded], vocab: tok.Vocabulary, report: Report
) -> tuple[Path, dict[str, list[Shard]]]:
    """write_shards for supervised records: tokens plus their flags files."""
    tmp = _staging(config)
    dtype = shards.dtype_for(manifest_vocab_size(config, vocab))
    splits: dict[str, list[Shard]] = {}
    for split, enc in encoded.items():
        writer = shards.ShardWriter(tmp, split, dtype, config.spec.data.sharding.tokens_per_shard, flags=True)
        writer.add(enc.ids, enc.flags)
        splits[split] = writer.close()
    _write_extras(tmp, vocab, report)
    return tmp, splits


def _commit(tmp: Path, data_dir: Path, manifest: DataManifest) -> None:
    """Moves the finished files into place; the manifest goes last, so a crash at any point leaves
    either the old complete output, or no manifest at all (which the next run rebuilds)."""
    (data_dir / MANIFEST_FILE).unlink(missing_ok=True)
    for split in shards.SPLITS:
        for old in data_dir.glob(f"{split}-*.bin"):  # flags files (.flags.bin) too
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
    padded = config.spec.data.format.supervised and config.spec.data.format.packing.value == "Padded"
    for split, (needed, why) in datacheck.training_needs(config).items():
        listed = splits.get(split, [])
        if padded:
            datacheck.require_records(split, sum(s.records for s in listed), needed, why)
        else:
            datacheck.require_windows(split, sum(s.tokens for s in listed), seq, needed, why)


def run(config: TrainerConfig) -> dict[str, Any]:
    """Prepares ``config.paths.data_dir``; returns the statistics (``skipped`` when already up to date)."""
    data = config.spec.data
    if not data.prepare:
        log.info("spec.data.prepare is false; expecting shards already in %s", config.paths.data_dir)
        return {"skipped": True, "reason": "spec.data.prepare is false"}
    t_start = time.monotonic()
    sources = preflight(config)
    data_dir = Path(config.paths.data_dir)
    chash = config_hash(config, sources, tokenizer_identity(config))
    if (existing := _up_to_date(data_dir, chash)) is not None:
        log.info("%s is up to date (config_hash %s); nothing to do", data_dir / MANIFEST_FILE, chash[:12])
        return {**existing.stats, "skipped": True}

    n_workers = workers(data.num_workers)
    # The tokenizers Rust pool reads this once, when it first starts; keep it to numWorkers too.
    os.environ.setdefault("RAYON_NUM_THREADS", str(n_workers))
    report = Report({"skipped": False, "workers": n_workers})
    if data.format.supervised:
        return run_records(config, sources, report, t_start, chash)
    with report.stage("read"):
        docs = read_sources(sources, report)
    texts = _filter(docs, data, report).texts
    train_idx, val_idx = split_indices(len(texts), data.sharding.validation_fraction, data.sharding.seed)
    train_texts, val_texts = [texts[i] for i in train_idx], [texts[i] for i in val_idx]
    with report.stage("augment"):
        augmented = augment_documents(train_texts, data, report)
    with report.stage("tokenizer"):
        vocab = build_tokenizer(config, train_texts)
    if augmented:
        train_texts = train_texts + augmented
        random.Random(data.sharding.seed + 1).shuffle(train_texts)
    report.stats["documents_out"] = {"train": len(train_texts), "val": len(val_texts)}
    with report.stage("tokenise_and_write"):
        tmp, splits = write_shards(config, {"train": train_texts, "val": val_texts}, vocab, report)
    try:
        check_tokens(config, splits)
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(config, report, t_start, tmp, splits, vocab, chash)


def _labelled(sources: list[readers.ResolvedSource], report: Report) -> list[tuple[str, Any]]:
    counts: collections.Counter[str] = collections.Counter()
    out: list[tuple[str, Any]] = []
    per_source: dict[str, int] = {}
    for src in sources:
        before = len(out)
        out += [(f"{src.source.uri}#{j}", r) for j, r in enumerate(readers.read_records(src, counts))]
        per_source[src.source.uri] = len(out) - before
    report.stats.update(sources=per_source, reader=dict(counts))
    return out


def run_records(
    config: TrainerConfig, sources: list[readers.ResolvedSource], report: Report, t_start: float, chash: str
) -> dict[str, Any]:
    """The stage for supervised formats: records are validated and rendered, never cleaned (why: see
    ``records.render_all``), exactly deduplicated, split and tokenised with the model's tokenizer."""
    data = config.spec.data
    with report.stage("tokenizer"):
        vocab = tok.load_pretrained(config)
    with report.stage("read"):
        raw = _labelled(sources, report)
    malformed_json = report.stats["reader"].get("malformed_record", 0)
    read = len(raw) + malformed_json
    report.stats["documents_in"] = read
    with report.stage("render"):
        renderer = records.Renderer(data.format, vocab.hf)
        rendered = records.render_all(renderer, raw, dedup=data.deduplication.exact)
    if malformed_json:
        rendered.problems.counts[("<record>", "not_json")] += malformed_json
    invalid = rendered.problems.by_field()
    log.info(
        "records: %d read, %d usable, %d invalid %s, %d exact duplicates",
        read,
        len(rendered.segments),
        rendered.problems.total,
        json.dumps(invalid, sort_keys=True),
        rendered.duplicates,
    )
    if data.augmentation.enabled:
        log.warning("augmentation is not applied to supervised records: it would corrupt their answers")
    report.removed["exact_duplicate"] = rendered.duplicates
    report.stats["exact_duplicates"] = rendered.duplicates
    report.stats["invalid_records"] = invalid
    records.require_usable(renderer, rendered, read)
    train_idx, val_idx = split_indices(
        len(rendered.segments), data.sharding.validation_fraction, data.sharding.seed
    )
    report.stats["records"] = {
        "read": read,
        "usable": len(rendered.segments),
        "invalid": rendered.problems.total,
        "duplicates": rendered.duplicates,
        "train": len(train_idx),
        "val": len(val_idx),
    }
    report.stats["documents_out"] = {"train": len(train_idx), "val": len(val_idx)}
    encoder = records.Encoder(vocab.hf, vocab.eos_id, chat=data.format.type.value == "Chat")
    with report.stage("tokenise_and_write"):
        encoded = {
            split: encoder.encode([rendered.segments[i] for i in idx])
            for split, idx in (("train", train_idx), ("val", val_idx))
        }
        report.stats["loss_tokens"] = {
            split: int(np.count_nonzero(enc.flags & LOSS_FLAG)) for split, enc in encoded.items()
        }
        tmp, splits = write_record_shards(config, encoded, vocab, report)
    try:
        check_tokens(config, splits)
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(config, report, t_start, tmp, splits, vocab, chash)


def _finish(
    config: TrainerConfig,
    report: Report,
    t_start: float,
    tmp: Path,
    splits: dict[str, list[Shard]],
    vocab: tok.Vocabulary,
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
    vocab_size = manifest_vocab_size(config, vocab)
    fmt = config.spec.data.format
    manifest = DataManifest(
        dtype=shards.dtype_for(vocab_size).name,
        vocab_size=vocab_size,
        eos_id=vocab.eos_id,
        pad_id=vocab.pad_id,
        splits=splits,
        stats=stats,
        config_hash=chash,
        record_format=fmt.type.value,
        packing=fmt.packing.value,
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
