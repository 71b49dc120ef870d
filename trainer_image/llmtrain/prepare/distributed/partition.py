"""dedup, pod j of N: hash partition j of every scan pod's records.

* Exact groups: records with equal keys; the smallest ord (earliest document) is kept, the rest are
  written to ``exact.npy`` as (kept ord, removed ord) rows.
* LSH buckets: records with equal (band, key). With exact dedup on, a bucket first drops every member
  whose exact key an earlier member has: exactly the documents exact dedup removes, since identical
  normalised texts have identical shingles, so the kept copy is in each of their buckets. The rest
  is lsh.candidate_pairs' rule over the documents left after exact dedup: all pairs of a bucket of up
  to 32, a chain through a larger one, in global order; so the pairs are the single pod's.
* Candidates are verified by the estimated Jaccard of the scan pods' memory-mapped signatures and
  the verified ones written to ``pairs.npy``.

Memory: this partition's records (about docs/N x (24 B + bands x 28 B)) and its candidate pairs.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmop_contract.api.v1alpha1.data import PreparePhase
from llmtrain.prepare import lsh
from llmtrain.prepare.distributed.common import ROW_MASK, SHIFT, Context
from llmtrain.prepare.distributed.scan import BAND_DTYPE, EXACT_DTYPE

log = logging.getLogger("llmtrain.prepare")
_VERIFY_CHUNK = 65536


def _load(ctx: Context, kind: str, index: int, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    parts = []
    for p in range(ctx.pods):
        ctx.work.require(PreparePhase.SCAN, p)
        path = ctx.work.out(PreparePhase.SCAN, p) / f"{kind}-{index}.bin"
        parts.append(np.fromfile(path, dtype=dtype))
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def _runs(*cols: npt.NDArray[Any]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(starts, ends) of the runs of equal rows of sorted ``cols``."""
    n = cols[0].size
    change = np.zeros(max(n - 1, 0), dtype=bool)
    for c in cols:
        change |= c[1:] != c[:-1]
    cuts = np.flatnonzero(change) + 1
    return np.concatenate(([0], cuts)).astype(np.int64), np.concatenate((cuts, [n])).astype(np.int64)


def exact_pairs(rec: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """(kept ord, removed ord) for every exact duplicate among ``rec``."""
    rec = rec[np.lexsort((rec["ord"], rec["k1"], rec["k0"]))]
    starts, ends = _runs(rec["k0"], rec["k1"])
    root = np.repeat(rec["ord"][starts], ends - starts)
    dup = np.ones(rec.size, dtype=bool)
    dup[starts] = False
    return np.stack((root[dup], rec["ord"][dup]), axis=1).astype(np.int64)


def candidate_pairs(rec: npt.NDArray[Any], exact: bool) -> npt.NDArray[np.int64]:
    """Unique (ord, ord) pairs, smaller first, sharing a bucket; lsh.candidate_pairs' rule."""
    if exact and rec.size:
        rec = rec[np.lexsort((rec["ord"], rec["ekey"], rec["key"], rec["band"]))]
        starts, _ = _runs(rec["band"], rec["key"], rec["ekey"])
        rec = rec[starts]
    rec = rec[np.lexsort((rec["ord"], rec["key"], rec["band"]))]
    starts, ends = _runs(rec["band"], rec["key"])
    size = ends - starts
    ords = rec["ord"]
    chunks = [np.stack((ords[starts[size == 2]], ords[starts[size == 2] + 1]), axis=1)]
    for s, e in zip(starts[size > 2], ends[size > 2], strict=True):
        members = ords[s:e]
        if members.size <= lsh._MAX_FULL_BUCKET:
            chunks.append(np.array(list(itertools.combinations(members, 2)), dtype=np.int64))
        else:
            chunks.append(np.stack((members[:-1], members[1:]), axis=1))
    pairs = np.concatenate(chunks).astype(np.int64)
    return np.unique(pairs, axis=0) if pairs.size else np.empty((0, 2), dtype=np.int64)


def signatures(ctx: Context) -> list[npt.NDArray[np.uint32]]:
    """Every scan pod's signatures, memory-mapped."""
    out: list[npt.NDArray[np.uint32]] = []
    for p in range(ctx.pods):
        path = ctx.work.out(PreparePhase.SCAN, p) / "signatures.npy"
        out.append(np.load(path, mmap_mode="r"))
    return out


def _gather(sigs: list[npt.NDArray[np.uint32]], ords: npt.NDArray[np.int64]) -> npt.NDArray[np.uint32]:
    pods, rows = ords >> SHIFT, ords & ROW_MASK
    out = np.empty((ords.size, sigs[0].shape[1]), dtype=np.uint32)
    for p in np.unique(pods).tolist():
        m = pods == p
        out[m] = sigs[p][rows[m]]
    return out


def verify(
    sigs: list[npt.NDArray[np.uint32]], pairs: npt.NDArray[np.int64], threshold: float
) -> npt.NDArray[np.int64]:
    """The pairs whose estimated Jaccard reaches ``threshold`` (minhash.estimated_jaccard's estimate)."""
    keep = np.zeros(pairs.shape[0], dtype=bool)
    for lo in range(0, pairs.shape[0], _VERIFY_CHUNK):
        part = pairs[lo : lo + _VERIFY_CHUNK]
        est = (_gather(sigs, part[:, 0]) == _gather(sigs, part[:, 1])).mean(axis=1)
        keep[lo : lo + part.shape[0]] = est >= threshold
    return pairs[keep]


def _save(path: Path, arr: npt.NDArray[Any]) -> None:
    with open(path, "wb") as fh:
        np.save(fh, arr)


def run(ctx: Context, index: int) -> dict[str, Any]:
    data = ctx.config.spec.data
    start = time.monotonic()
    staging = ctx.work.begin(PreparePhase.DEDUP, index)
    exact_rec = _load(ctx, "exact", index, EXACT_DTYPE)
    exact = exact_pairs(exact_rec) if exact_rec.size else np.empty((0, 2), dtype=np.int64)
    _save(staging / "exact.npy", exact)
    n_keys = int(exact_rec.size)
    log.info("dedup %d: %d exact keys, %d exact duplicates", index, exact_rec.size, exact.shape[0])
    del exact_rec
    near = data.deduplication.near
    band_rec = _load(ctx, "bands", index, BAND_DTYPE)
    candidates = (
        candidate_pairs(band_rec, data.deduplication.exact) if band_rec.size else np.empty((0, 2), np.int64)
    )
    log.info("dedup %d: %d band records, %d candidate pairs", index, band_rec.size, candidates.shape[0])
    del band_rec
    verified = verify(signatures(ctx), candidates, near.threshold) if candidates.size else candidates
    _save(staging / "pairs.npy", verified)
    seconds = time.monotonic() - start
    log.info("dedup %d: %d verified near pairs (%.1fs)", index, verified.shape[0], seconds)
    stats: dict[str, Any] = {
        "exact_keys": n_keys,
        "exact_duplicates": int(exact.shape[0]),
        "candidate_pairs": int(candidates.shape[0]),
        "verified_pairs": int(verified.shape[0]),
        "seconds": round(seconds, 3),
        # A partition's documents are those whose exact key it holds (none with exact dedup off).
        "results": {
            "documentsRead": n_keys,
            "documentsKept": n_keys - int(exact.shape[0]),
            "candidatePairs": int(candidates.shape[0]),
            "duplicatePairs": int(verified.shape[0]) + int(exact.shape[0]),
        },
    }
    ctx.work.finish(PreparePhase.DEDUP, index, staging, stats)
    return stats
