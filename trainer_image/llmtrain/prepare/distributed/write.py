"""write, pod i of N: tokenise slice i's kept documents into this pod's own shards.

Documents are streamed from the scan spill in global order, the cluster's removals dropped, each
assigned to train or validation by the hash of its gid (``cluster.Kept.val``), and each training
document followed by its augmented copies (augment seeds each copy from the text, so they are the
same for any pod count; unlike the single pod, train is not shuffled, so the concatenated token
stream over the pods in order is the same for any N). Shards are ``<split>-<pod>-<k>.bin`` in
``write/<i>/``, cut by ShardWriter at tokensPerShard within the pod: every pod's last shard of a
split may be short, so shard boundaries (not tokens) depend on N.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import numpy as np

from llmop_contract.api.v1alpha1.data import PreparePhase
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmtrain.prepare import augment, shards
from llmtrain.prepare import tokenizer as tok
from llmtrain.prepare.distributed import cluster, common
from llmtrain.prepare.distributed.common import Context
from llmtrain.prepare.parallel import PROGRESS_SECONDS
from llmtrain.prepare.pipeline import manifest_vocab_size

log = logging.getLogger("llmtrain.prepare")
# An encode batch is held as Python int lists (~36 B a token): bound it by text bytes too.
_ENCODE_BATCH = 1000
_ENCODE_BYTES = 1 << 20


def vocabulary(ctx: Context) -> tok.Vocabulary:
    """The pretrained model's tokenizer, the configured file, or the BPE the cluster pod trained."""
    config: TrainerConfig = ctx.config
    if config.spec.model.pretrained is not None:
        return tok.load_pretrained(config)
    scratch = config.spec.model.scratch()
    path = config.spec.data.tokenizer.path or str(cluster.tokenizer_file(ctx))
    return tok.bpe_vocabulary(tok.load(path, scratch.vocab_size), scratch.context_length)


class _Split:
    def __init__(self, writer: shards.ShardWriter, vocab: tok.Vocabulary) -> None:
        self.writer, self.vocab, self.docs, self.pending_bytes = writer, vocab, 0, 0
        self.pending: list[str] = []

    def add(self, text: str) -> None:
        self.pending.append(text)
        self.docs += 1
        self.pending_bytes += len(text)
        if len(self.pending) >= _ENCODE_BATCH or self.pending_bytes >= _ENCODE_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            eos = [self.vocab.eos_id]
            encodings = self.vocab.encode_batch(self.pending)
            flat = itertools.chain.from_iterable(itertools.chain(ids, eos) for ids in encodings)
            self.writer.add(np.fromiter(flat, dtype=np.int64))
            self.pending, self.pending_bytes = [], 0


def run(ctx: Context, index: int) -> dict[str, Any]:
    config = ctx.config
    data = config.spec.data
    start = last = time.monotonic()
    vocab = vocabulary(ctx)
    prefix = common.source_prefix(ctx)
    kept = cluster.Kept(ctx, index, cluster.removal(ctx, index), prefix)
    val = kept.val(data.sharding.validation_fraction, cluster.forced(ctx))
    aug = data.augmentation
    thesaurus = augment.load_thesaurus(aug.thesaurus_path) if aug.enabled and aug.thesaurus_path else {}
    staging = ctx.work.begin(PreparePhase.WRITE, index)
    dtype = shards.dtype_for(manifest_vocab_size(config, vocab))
    size = data.sharding.tokens_per_shard
    splits = {
        name: _Split(shards.ShardWriter(staging, f"{name}-{index:05d}", dtype, size), vocab)
        for name in shards.SPLITS
    }
    augmented = read = 0
    for row, text in enumerate(cluster.spill(ctx, index)):
        read += 1
        if not kept.keep[row]:
            continue
        if val[row]:
            splits["val"].add(text)
            continue
        splits["train"].add(text)
        if aug.enabled:
            for c in range(aug.copies):
                splits["train"].add(augment.augment(text, aug, thesaurus, c))
                augmented += 1
        now = time.monotonic()
        if now - last >= PROGRESS_SECONDS:
            last = now
            log.info("write %d: %d docs read, %.0f docs/s", index, read, read / (now - start))
    listed = {}
    for name, split in splits.items():
        split.flush()
        listed[name] = split.writer.close()
    tokens = {name: sum(s.tokens for s in listed[name]) for name in listed}
    seconds = time.monotonic() - start
    log.info(
        "write %d: %s tokens in %s shards (%.1fs)",
        index,
        tokens,
        {k: len(v) for k, v in listed.items()},
        seconds,
    )
    documents_out = {"train": splits["train"].docs - augmented, "val": splits["val"].docs}
    stats: dict[str, Any] = {
        "documents_out": documents_out,
        "augmented_documents": augmented,
        "tokens": tokens,
        "shards": {name: [s.model_dump(mode="json") for s in listed[name]] for name in listed},
        "seconds": round(seconds, 3),
        "results": {
            "documentsRead": read,
            "documentsKept": documents_out["train"] + documents_out["val"],
            "tokens": sum(tokens.values()),
            "shards": sum(len(v) for v in listed.values()),
        },
    }
    ctx.work.finish(PreparePhase.WRITE, index, staging, stats)
    return stats
