"""The prepare stage end to end: read, clean, deduplicate, split, augment, tokenise, shard, commit."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmop_contract.api.v1alpha1.data import Augmentation, Cleaning
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmtrain.prepare import augment, clean, dedup, readers, shards
from llmtrain.prepare import tokenizer as tok
from llmtrain.prepare.errors import ConfigError
from llmtrain.prepare.fingerprint import config_hash
from llmtrain.prepare.parallel import PROGRESS_SECONDS, map_chunks, workers

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
    elif config.spec.model.vocab_size < tok.MIN_VOCAB:
        raise ConfigError(
            "spec.model.vocabSize",
            f"a byte-level BPE needs at least {tok.MIN_VOCAB} tokens, got {config.spec.model.vocab_size}",
        )
    aug = data.augmentation
    if aug.enabled and aug.synonym_replacement and not os.path.isfile(aug.thesaurus_path or ""):
        raise ConfigError("spec.data.augmentation.thesaurusPath", f"{aug.thesaurus_path!r} is not a file")
    return sources


def _clean_chunk(texts: Sequence[str], cfg: Cleaning) -> tuple[list[str | None], Counter[str]]:
    out: list[str | None] = []
    events: Counter[str] = Counter()
    for text in texts:
        cleaned, ev = clean.clean(text, cfg)
        out.append(cleaned)
        events.update(ev)
    return out, events


def _augment_chunk(texts: Sequence[str], cfg: Augmentation, thesaurus: augment.Thesaurus) -> list[str]:
    return [augment.augment(t, cfg, thesaurus, c) for t in texts for c in range(cfg.copies)]


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


def _commit(tmp: Path, data_dir: Path, manifest: dict[str, Any]) -> None:
    """Moves the finished files into place; the manifest goes last, so a crash at any point leaves
    either the old complete output, or no manifest at all (which the next run rebuilds)."""
    (data_dir / shards.MANIFEST).unlink(missing_ok=True)
    for split in shards.SPLITS:
        for old in data_dir.glob(f"{split}-*.bin"):
            old.unlink()
    for f in sorted(tmp.iterdir()):
        os.replace(f, data_dir / f.name)
    staged = data_dir / f".{shards.MANIFEST}.tmp"
    with open(staged, "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(staged, data_dir / shards.MANIFEST)
    tmp.rmdir()
    dir_fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
    existing = shards.read_manifest(data_dir)
    if existing and existing.get("config_hash") == chash and shards.shards_present(data_dir, existing):
        log.info("%s is up to date (config_hash %s); nothing to do", data_dir / shards.MANIFEST, chash[:12])
        return {**existing["stats"], "skipped": True}

    n_workers = workers(data.num_workers)
    # The tokenizers Rust pool reads this once, when it first starts; keep it to numWorkers too.
    os.environ.setdefault("RAYON_NUM_THREADS", str(n_workers))
    seconds: dict[str, float] = {}
    stats: dict[str, Any] = {"skipped": False, "workers": n_workers}

    t = time.monotonic()
    reader_counts: Counter[str] = Counter()
    texts: list[str] = []
    origins: list[str] = []
    per_source: dict[str, int] = {}
    for src in sources:
        before = len(texts)
        for j, text in enumerate(readers.read(src, reader_counts)):
            texts.append(text)
            origins.append(f"{src.source.uri}#{j}")
        per_source[src.source.uri] = len(texts) - before
    stats["documents_in"] = len(texts)
    stats["sources"] = per_source
    stats["reader"] = dict(reader_counts)
    stats["input_bytes"] = sum(len(t.encode()) for t in texts)
    seconds["read"] = time.monotonic() - t
    log.info("read %d documents (%d bytes) from %d sources", len(texts), stats["input_bytes"], len(sources))

    t = time.monotonic()
    removed: Counter[str] = Counter()
    edits: Counter[str] = Counter()
    kept_texts: list[str] = []
    kept_origins: list[str] = []
    fn = functools.partial(_clean_chunk, cfg=data.cleaning)
    offset = 0
    for cleaned, events in map_chunks(fn, texts, data.num_workers, "clean"):
        for k, v in events.items():
            (removed if k.startswith("removed:") else edits)[k.removeprefix("removed:")] += v
        for i, c in enumerate(cleaned):
            if c is not None:
                kept_texts.append(c)
                kept_origins.append(origins[offset + i])
        offset += len(cleaned)
    texts, origins = kept_texts, kept_origins
    stats["cleaning"] = {"removed": dict(removed), "edits": dict(edits), "documents_out": len(texts)}
    seconds["clean"] = time.monotonic() - t

    t = time.monotonic()
    report: list[dict[str, Any]] = []
    if data.deduplication.exact:
        keep = dedup.exact_keep(texts)
        first: dict[bytes, int] = {}
        groups: dict[int, list[int]] = {}
        for i, text in enumerate(texts):
            root = first.setdefault(dedup.exact_key(text), i)
            if root != i:
                groups.setdefault(root, []).append(i)
        report += [
            {"kind": "exact", "kept": origins[r], "removed": [origins[i] for i in m]}
            for r, m in groups.items()
        ]
        removed["exact_duplicate"] = int((~keep).sum())
        texts = [x for x, k in zip(texts, keep, strict=True) if k]
        origins = [x for x, k in zip(origins, keep, strict=True) if k]
    stats["exact_duplicates"] = removed["exact_duplicate"]
    seconds["exact_dedup"] = time.monotonic() - t

    t = time.monotonic()
    near_stats: dict[str, Any] = {"enabled": data.deduplication.near.enabled}
    if data.deduplication.near.enabled:
        res = dedup.near_duplicates(texts, data.deduplication.near, data.num_workers)
        report += [
            {"kind": "near", "kept": origins[c[0]], "removed": [origins[i] for i in c[1:]]}
            for c in res.clusters
        ]
        removed["near_duplicate"] = res.removed
        near_stats.update(
            clusters=len(res.clusters),
            removed=res.removed,
            candidate_pairs=res.candidate_pairs,
            verified_pairs=res.verified_pairs,
            bands=res.bands,
            rows=res.rows,
        )
        texts = [x for x, k in zip(texts, res.keep, strict=True) if k]
    stats["near_duplicates"] = near_stats
    stats["removed_by_rule"] = dict(removed)
    seconds["near_dedup"] = time.monotonic() - t
    log.info(
        "cleaning removed %d, exact duplicates %d, near duplicates %d in %d clusters; %d documents left",
        sum(v for k, v in removed.items() if not k.endswith("_duplicate")),
        removed["exact_duplicate"],
        removed["near_duplicate"],
        near_stats.get("clusters", 0),
        len(texts),
    )
    if not texts:
        raise ConfigError("spec.data.cleaning", "no document survived cleaning and deduplication")

    train_idx, val_idx = split_indices(len(texts), data.sharding.validation_fraction, data.sharding.seed)
    train_texts = [texts[i] for i in train_idx]
    val_texts = [texts[i] for i in val_idx]

    t = time.monotonic()
    aug = data.augmentation
    augmented: list[str] = []
    if aug.enabled:
        # Only training documents are augmented: a noisy copy of a validation document in the
        # training split would leak it.
        thesaurus = augment.load_thesaurus(aug.thesaurus_path) if aug.thesaurus_path else {}
        afn = functools.partial(_augment_chunk, cfg=aug, thesaurus=thesaurus)
        for part in map_chunks(afn, train_texts, data.num_workers, "augment"):
            augmented.extend(part)
    stats["augmented_documents"] = len(augmented)
    seconds["augment"] = time.monotonic() - t

    t = time.monotonic()
    if data.tokenizer.path:
        info = tok.load(data.tokenizer.path, config.spec.model.vocab_size)
    else:
        # Trained on the clean training split only, without the noisy augmented copies.
        info = tok.train(train_texts, config.spec.model.vocab_size)
    seconds["tokenizer"] = time.monotonic() - t
    log.info(
        "tokenizer: %d tokens, eos %r=%d, pad %r=%d",
        info.vocab_size,
        info.eos,
        info.eos_id,
        info.pad,
        info.pad_id,
    )

    if augmented:
        train_texts = train_texts + augmented
        random.Random(data.sharding.seed + 1).shuffle(train_texts)

    t = time.monotonic()
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob(".prepare-tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = data_dir / f".prepare-tmp-{os.getpid()}"
    tmp.mkdir()
    vocab_size = config.spec.model.vocab_size
    dtype = shards.dtype_for(vocab_size)
    splits: dict[str, list[dict[str, Any]]] = {}
    tokens: dict[str, int] = {}
    for split, split_texts in (("train", train_texts), ("val", val_texts)):
        writer = shards.ShardWriter(tmp, split, dtype, data.sharding.tokens_per_shard)
        _write_split(split_texts, info, writer, split)
        splits[split] = writer.close()
        tokens[split] = writer.tokens
    tok.save(info, tmp, config.spec.model.context_length)
    with open(tmp / REPORT, "w") as fh:
        for entry in report:
            fh.write(json.dumps(entry) + "\n")
    seconds["tokenise_and_write"] = time.monotonic() - t

    seconds["total"] = time.monotonic() - t_start
    stats["documents_out"] = {"train": len(train_texts), "val": len(val_texts)}
    stats["tokens"] = tokens
    stats["shards"] = {k: len(v) for k, v in splits.items()}
    stats["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    stats["docs_per_second"] = round(stats["documents_in"] / max(seconds["total"], 1e-9), 1)
    manifest = {
        "format": shards.FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": info.eos_id,
        "pad_id": info.pad_id,
        "tokenizer": "tokenizer.json",
        "splits": splits,
        "stats": stats,
        "config_hash": chash,
    }
    _commit(tmp, data_dir, manifest)
    log.info(
        "wrote %s: train %d tokens in %d shards, val %d tokens in %d shards (%.1fs)",
        data_dir / shards.MANIFEST,
        tokens["train"],
        len(splits["train"]),
        tokens["val"],
        len(splits["val"]),
        seconds["total"],
    )
    return stats
