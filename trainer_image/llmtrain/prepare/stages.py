"""The document stages of prepare, in order: read, clean, exact and near dedup, augment, tokenizer.

Each takes the surviving ``Docs`` and the run's ``Report`` (statistics, removals, duplicate
clusters) and returns what the next one needs; ``pipeline.run`` calls them, each timed by
``Report.stage``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from llmop_contract.api.v1alpha1.data import Augmentation, Cleaning, DataSpec
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmtrain.prepare import augment, clean, dedup, readers
from llmtrain.prepare import tokenizer as tok
from llmtrain.prepare.parallel import map_chunks

log = logging.getLogger("llmtrain.prepare")


@dataclass
class Docs:
    """The surviving documents and where each came from (``<uri>#<index>``, for the dedup report)."""

    texts: list[str]
    origins: list[str]

    def keep(self, mask: Sequence[bool]) -> Docs:
        return Docs(
            [x for x, k in zip(self.texts, mask, strict=True) if k],
            [x for x, k in zip(self.origins, mask, strict=True) if k],
        )


@dataclass
class Report:
    """What a run reports: the statistics, seconds per stage, removals by rule, duplicate clusters."""

    stats: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    removed: Counter[str] = field(default_factory=Counter)
    clusters: list[dict[str, Any]] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times the block into ``seconds[name]``."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = time.monotonic() - start


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


def read_sources(sources: list[readers.ResolvedSource], report: Report) -> Docs:
    reader_counts: Counter[str] = Counter()
    docs = Docs([], [])
    per_source: dict[str, int] = {}
    for src in sources:
        before = len(docs.texts)
        for j, text in enumerate(readers.read(src, reader_counts)):
            docs.texts.append(text)
            docs.origins.append(f"{src.source.uri}#{j}")
        per_source[src.source.uri] = len(docs.texts) - before
    stats = report.stats
    stats["documents_in"] = len(docs.texts)
    stats["sources"] = per_source
    stats["reader"] = dict(reader_counts)
    stats["input_bytes"] = sum(len(t.encode()) for t in docs.texts)
    log.info(
        "read %d documents (%d bytes) from %d sources", len(docs.texts), stats["input_bytes"], len(sources)
    )
    return docs


def clean_documents(docs: Docs, data: DataSpec, report: Report) -> Docs:
    edits: Counter[str] = Counter()
    out = Docs([], [])
    fn = functools.partial(_clean_chunk, cfg=data.cleaning)
    offset = 0
    for cleaned, events in map_chunks(fn, docs.texts, data.num_workers, "clean"):
        for k, v in events.items():
            (report.removed if k.startswith("removed:") else edits)[k.removeprefix("removed:")] += v
        for i, c in enumerate(cleaned):
            if c is not None:
                out.texts.append(c)
                out.origins.append(docs.origins[offset + i])
        offset += len(cleaned)
    report.stats["cleaning"] = {
        "removed": dict(report.removed),
        "edits": dict(edits),
        "documents_out": len(out.texts),
    }
    return out


def exact_dedup(docs: Docs, data: DataSpec, report: Report) -> Docs:
    if data.deduplication.exact:
        keep = dedup.exact_keep(docs.texts)
        first: dict[bytes, int] = {}
        groups: dict[int, list[int]] = {}
        for i, text in enumerate(docs.texts):
            root = first.setdefault(dedup.exact_key(text), i)
            if root != i:
                groups.setdefault(root, []).append(i)
        report.clusters += [
            {"kind": "exact", "kept": docs.origins[r], "removed": [docs.origins[i] for i in m]}
            for r, m in groups.items()
        ]
        report.removed["exact_duplicate"] = int((~keep).sum())
        docs = docs.keep(keep.tolist())
    report.stats["exact_duplicates"] = report.removed["exact_duplicate"]
    return docs


def near_dedup(docs: Docs, data: DataSpec, report: Report) -> Docs:
    near_stats: dict[str, Any] = {"enabled": data.deduplication.near.enabled}
    if data.deduplication.near.enabled:
        res = dedup.near_duplicates(docs.texts, data.deduplication.near, data.num_workers)
        report.clusters += [
            {"kind": "near", "kept": docs.origins[c[0]], "removed": [docs.origins[i] for i in c[1:]]}
            for c in res.clusters
        ]
        report.removed["near_duplicate"] = res.removed
        near_stats.update(
            clusters=len(res.clusters),
            removed=res.removed,
            candidate_pairs=res.candidate_pairs,
            verified_pairs=res.verified_pairs,
            bands=res.bands,
            rows=res.rows,
        )
        docs = docs.keep(list(res.keep))
    report.stats["near_duplicates"] = near_stats
    report.stats["removed_by_rule"] = dict(report.removed)
    return docs


def augment_documents(train_texts: list[str], data: DataSpec, report: Report) -> list[str]:
    """Noisy copies of the training documents only: a copy of a validation document would leak it."""
    aug = data.augmentation
    augmented: list[str] = []
    if aug.enabled:
        thesaurus = augment.load_thesaurus(aug.thesaurus_path) if aug.thesaurus_path else {}
        afn = functools.partial(_augment_chunk, cfg=aug, thesaurus=thesaurus)
        for part in map_chunks(afn, train_texts, data.num_workers, "augment"):
            augmented.extend(part)
    report.stats["augmented_documents"] = len(augmented)
    return augmented


def build_tokenizer(config: TrainerConfig, train_texts: list[str]) -> tok.Vocabulary:
    """The pretrained model's tokenizer; else the configured tokenizer file, or a BPE trained on the
    clean training split (without augmented copies)."""
    if config.spec.model.pretrained is not None:
        return tok.load_pretrained(config)
    path, vocab_size = config.spec.data.tokenizer.path, config.spec.model.scratch().vocab_size
    info = tok.load(path, vocab_size) if path else tok.train(train_texts, vocab_size)
    log.info(
        "tokenizer: %d tokens, eos %r=%d, pad %r=%d",
        info.vocab_size,
        info.eos,
        info.eos_id,
        info.pad,
        info.pad_id,
    )
    return tok.bpe_vocabulary(info, config.spec.model.scratch().context_length)
