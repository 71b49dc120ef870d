"""cluster, one pod: the dedup decisions, the split's safeguards and the tokenizer.

Exact duplicates are removed first; union-find runs over every partition's verified near pairs
among what is left, and the earliest document of each cluster is kept: the single pod's result.
Outputs in ``cluster/0/``: ``remove-<pod>.npy`` (the sorted rows each write pod drops),
``dedup_clusters.jsonl`` (today's report, the same entries in the same order), ``split.json`` and,
unless the tokenizer is given, ``tokenizer.json``.

Split: a document is validation when ``split_hash(gid, seed) < validationFraction``; when that leaves
validation empty (a tiny corpus) the kept document with the smallest hash goes there, and when it
leaves train empty the one with the largest hash goes to train.

Tokenizer: a BPE trained on the kept training documents whose ``sample_hash(gid)`` is below
``min(1, TOKENIZER_SAMPLE_BYTES / their bytes)``: every one of them up to 64 MB, a hash-chosen
sample of about 64 MB beyond; read in global order, so it is the same for any pod count.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmop_contract.api.v1alpha1.data import PreparePhase
from llmtrain.config import DataError
from llmtrain.prepare import dedup, lsh
from llmtrain.prepare import tokenizer as tok
from llmtrain.prepare.distributed import common
from llmtrain.prepare.distributed.common import ROW_MASK, SHIFT, Context

log = logging.getLogger("llmtrain.prepare")
TOKENIZER_SAMPLE_BYTES = 64 << 20
REPORT = "dedup_clusters.jsonl"


def _concat(ctx: Context, name: str) -> npt.NDArray[np.int64]:
    parts = []
    for j in range(ctx.pods):
        ctx.work.require(PreparePhase.DEDUP, j)
        parts.append(np.load(ctx.work.out(PreparePhase.DEDUP, j) / name).reshape(-1, 2))
    return np.concatenate(parts).astype(np.int64) if parts else np.empty((0, 2), dtype=np.int64)


def near_clusters(pairs: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
    """Connected components of ``pairs`` (of ords), each sorted, ordered by their first member."""
    if not pairs.size:
        return []
    nodes, inverse = np.unique(pairs, return_inverse=True)
    inverse = inverse.reshape(-1, 2)
    uf = lsh.UnionFind(nodes.size)
    for a, b in inverse.tolist():
        uf.union(a, b)
    roots = np.fromiter((uf.find(i) for i in range(nodes.size)), dtype=np.int64, count=nodes.size)
    order = np.lexsort((np.arange(nodes.size), roots))
    cuts = np.flatnonzero(np.diff(roots[order])) + 1
    return [nodes[g] for g in np.split(order, cuts)]


class _Origins:
    """``<uri>#<j>`` of any ord, from the memory-mapped row records."""

    def __init__(self, ctx: Context, prefix: npt.NDArray[np.int64]) -> None:
        self.uris = [s.source.uri for s in ctx.sources]
        self.rows = [common.rows(ctx, p) for p in range(ctx.pods)]
        self.prefix = prefix

    def __call__(self, ords: npt.NDArray[np.int64]) -> list[str]:
        out = []
        for o in ords.tolist():
            pod, row = o >> SHIFT, o & ROW_MASK
            rec = self.rows[pod][row]
            src = int(rec["source"])
            out.append(f"{self.uris[src]}#{int(self.prefix[pod, src] + rec['j'])}")
        return out


def _report(
    exact: npt.NDArray[np.int64], clusters: list[npt.NDArray[np.int64]], origin: _Origins
) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    if exact.size:
        # stages.exact_dedup lists groups in the order their first duplicate appears.
        exact = exact[np.lexsort((exact[:, 1], exact[:, 0]))]
        cuts = np.flatnonzero(np.diff(exact[:, 0])) + 1
        groups = np.split(exact, cuts)
        groups.sort(key=lambda g: int(g[0, 1]))
        for g in groups:
            entries.append({"kind": "exact", "kept": origin(g[:1, 0])[0], "removed": origin(g[:, 1])})
    for c in clusters:
        entries.append({"kind": "near", "kept": origin(c[:1])[0], "removed": origin(c[1:])})
    return entries


def _refuse_empty(documents_in: int, kept: int, exact: int, near: int) -> None:
    """pipeline._filter's refusals, word for word."""
    if not documents_in:
        raise DataError("spec.data.sources", "the sources hold no documents (0 read)")
    if not kept:
        raise DataError("spec.data.cleaning", "no document survived cleaning and deduplication")
    if kept < 2:
        raise DataError(
            "spec.data.sources",
            f"only 1 of {documents_in} documents is left after cleaning and deduplication "
            f"({exact} exact and {near} near duplicates removed); "
            "at least 2 distinct documents are needed, one for the validation split",
        )


class Kept:
    """Per scan pod: the kept rows' gids and which are validation (computed by write pods too)."""

    def __init__(
        self, ctx: Context, pod: int, removed_rows: npt.NDArray[np.int64], prefix: npt.NDArray[np.int64]
    ) -> None:
        rec = common.rows(ctx, pod)
        keep = np.ones(rec.size, dtype=bool)
        keep[removed_rows] = False
        self.keep = keep
        self.gid = common.gids(rec, prefix[pod])
        self.nbytes = np.asarray(rec["nbytes"])
        self.hash = common.split_hash(self.gid, ctx.config.spec.data.sharding.seed)

    def val(self, fraction: float, force: dict[str, int | None]) -> npt.NDArray[np.bool_]:
        val = self.hash < fraction
        if force.get("val") is not None:
            val |= self.gid == force["val"]
        if force.get("train") is not None:
            val &= self.gid != force["train"]
        return val & self.keep


def spill(ctx: Context, pod: int) -> Iterator[str]:
    """Pod ``pod``'s cleaned texts, row by row."""
    with open(ctx.work.out(PreparePhase.SCAN, pod) / "docs.jsonl", encoding="utf-8") as fh:
        for line in fh:
            text: str = json.loads(line)
            yield text


def removal(ctx: Context, pod: int) -> npt.NDArray[np.int64]:
    ctx.work.require(PreparePhase.CLUSTER, 0)
    return np.asarray(np.load(ctx.work.out(PreparePhase.CLUSTER, 0) / f"remove-{pod}.npy"), dtype=np.int64)


def forced(ctx: Context) -> dict[str, int | None]:
    ctx.work.require(PreparePhase.CLUSTER, 0)
    result: dict[str, int | None] = json.loads(
        (ctx.work.out(PreparePhase.CLUSTER, 0) / "split.json").read_text()
    )
    return result


def _split_guard(
    kept: Callable[[], Iterator[Kept]], fraction: float
) -> tuple[dict[str, int | None], int, int]:
    n_val = n_train = 0
    lo: tuple[float, int] | None = None
    hi: tuple[float, int] | None = None
    for k in kept():
        h, g = k.hash[k.keep], k.gid[k.keep]
        if not h.size:
            continue
        v = h < fraction
        n_val, n_train = n_val + int(v.sum()), n_train + int((~v).sum())
        a, b = int(np.argmin(h)), int(np.argmax(h))
        lo = min(lo, (float(h[a]), int(g[a]))) if lo else (float(h[a]), int(g[a]))
        hi = max(hi, (float(h[b]), int(g[b]))) if hi else (float(h[b]), int(g[b]))
    force: dict[str, int | None] = {"val": None, "train": None}
    if n_val == 0 and lo is not None:
        force["val"], n_val, n_train = lo[1], 1, n_train - 1
    if n_train == 0 and hi is not None:
        force["train"], n_val, n_train = hi[1], n_val - 1, 1
    return force, n_val, n_train


def _sample(
    ctx: Context, kept: Callable[[], Iterator[Kept]], fraction: float, force: dict[str, int | None]
) -> Iterator[str]:
    total = sum(int(k.nbytes[k.keep & ~k.val(fraction, force)].sum()) for k in kept())
    share = min(1.0, TOKENIZER_SAMPLE_BYTES / max(total, 1))
    log.info("tokenizer sample: %.3f of %d bytes of training documents", share, total)
    for pod, k in enumerate(kept()):
        chosen = k.keep & ~k.val(fraction, force) & (common.sample_hash(k.gid) < share)
        for row, text in enumerate(spill(ctx, pod)):
            if chosen[row]:
                yield text


def run(ctx: Context, index: int) -> dict[str, Any]:
    config = ctx.config
    data = config.spec.data
    start = time.monotonic()
    scans = [ctx.work.require(PreparePhase.SCAN, p) for p in range(ctx.pods)]
    prefix = common.source_prefix(ctx)
    exact = _concat(ctx, "exact.npy")
    removed_exact = np.unique(exact[:, 1])
    pairs = _concat(ctx, "pairs.npy")
    candidates = sum(ctx.work.require(PreparePhase.DEDUP, j)["candidate_pairs"] for j in range(ctx.pods))
    pairs = np.unique(pairs, axis=0) if pairs.size else pairs
    if pairs.size:
        pairs = pairs[~np.isin(pairs, removed_exact).any(axis=1)]
    clusters = near_clusters(pairs)
    removed_near = np.concatenate([c[1:] for c in clusters]) if clusters else np.empty(0, dtype=np.int64)
    documents_in = sum(s["documents_read"] for s in scans)
    cleaned = sum(s["documents_kept"] for s in scans)
    n_exact, n_near = int(removed_exact.size), int(removed_near.size)
    _refuse_empty(documents_in, cleaned - n_exact - n_near, n_exact, n_near)
    staging = ctx.work.begin(PreparePhase.CLUSTER, index)
    removed = np.union1d(removed_exact, removed_near)
    pods_of = removed >> SHIFT
    per_pod = [np.sort(removed[pods_of == p] & ROW_MASK) for p in range(ctx.pods)]
    for p, rows in enumerate(per_pod):
        np.save(staging / f"remove-{p}.npy", rows)

    def kept() -> Iterator[Kept]:
        # One pod's rows at a time: this pod's memory must not grow with the corpus.
        return (Kept(ctx, p, rows, prefix) for p, rows in enumerate(per_pod))

    with open(staging / REPORT, "w") as fh:
        for entry in _report(exact, clusters, _Origins(ctx, prefix)):
            fh.write(json.dumps(entry) + "\n")
    fraction = data.sharding.validation_fraction
    force, n_val, n_train = _split_guard(kept, fraction)
    (staging / "split.json").write_text(json.dumps(force))
    if config.spec.model.pretrained is None and not data.tokenizer.path:
        info = tok.train(_sample(ctx, kept, fraction, force), config.spec.model.scratch().vocab_size)
        info.tokenizer.save(str(staging / "tokenizer.json"))
    seconds = time.monotonic() - start
    log.info(
        "cluster: %d exact and %d near duplicates in %d clusters; %d documents left (%.1fs)",
        n_exact,
        n_near,
        len(clusters),
        cleaned - n_exact - n_near,
        seconds,
    )
    bands, rows_per_band = lsh.optimal_bands(
        data.deduplication.near.threshold,
        data.deduplication.near.num_permutations,
        dedup.FP_WEIGHT,
        dedup.FN_WEIGHT,
    )
    near_stats: dict[str, Any] = {"enabled": data.deduplication.near.enabled}
    if data.deduplication.near.enabled:
        near_stats.update(
            clusters=len(clusters),
            removed=n_near,
            candidate_pairs=int(candidates),
            verified_pairs=int(pairs.shape[0]),
            bands=bands,
            rows=rows_per_band,
        )
    stats: dict[str, Any] = {
        "exact_duplicates": n_exact,
        "near_duplicates": near_stats,
        "documents_kept": cleaned - n_exact - n_near,
        "split": {"train": n_train, "val": n_val},
        "seconds": round(seconds, 3),
        "results": {
            "documentsRead": cleaned,
            "documentsKept": cleaned - n_exact - n_near,
            "duplicatePairs": int(pairs.shape[0]) + n_exact,
        },
    }
    ctx.work.finish(PreparePhase.CLUSTER, index, staging, stats)
    return stats


def tokenizer_file(ctx: Context) -> Path:
    return ctx.work.out(PreparePhase.CLUSTER, 0) / "tokenizer.json"
