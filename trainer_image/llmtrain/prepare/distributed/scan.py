"""scan, pod i of N: stream slice i, clean every document, and write what the later phases need.

Outputs in ``scan/<i>/``:

* ``docs.jsonl``: the cleaned texts (one JSON string a line), in global order; row r is line r.
* ``rows.bin``: a ``common.ROW_DTYPE`` record per row (source, j within this slice, bytes).
* ``signatures.npy``: ``(rows, numPermutations)`` uint32 MinHash signatures, memory-mappable.
* ``exact-<p>.bin`` / ``bands-<p>.bin``: records routed to dedup partition p, exact keys by
  ``key % N`` and LSH band keys by ``hash(band, key) % N``. They are buffered and appended to the
  files whenever the buffers reach ``_FLUSH_BYTES``, so memory stays bounded whatever the slice size.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from llmop_contract.api.v1alpha1.data import PreparePhase
from llmtrain.prepare import clean, dedup, lsh, minhash
from llmtrain.prepare.distributed import slices
from llmtrain.prepare.distributed.common import SHIFT, Context, mix64
from llmtrain.prepare.parallel import PROGRESS_SECONDS

log = logging.getLogger("llmtrain.prepare")

EXACT_DTYPE = np.dtype([("k0", "<u8"), ("k1", "<u8"), ("ord", "<i8")])
# ekey: the first 8 bytes of the exact key, so a dedup partition can drop exact duplicates from a
# bucket (they have identical signatures, hence always share their buckets with the kept copy);
# 0 with exact dedup off, when no exact key is computed (dedup then never reads it).
BAND_DTYPE = np.dtype([("band", "<u4"), ("key", "<u8"), ("ekey", "<u8"), ("ord", "<i8")])
_BATCH_DOCS = 1000
_BATCH_BYTES = 8 << 20
_FLUSH_BYTES = 32 << 20
# numpy's .npy header for a 2-d uint32 array is padded to 128 bytes for any realistic row count;
# reserving it lets the signatures be streamed and the header written once the count is known.
_NPY_HEADER = 128


def partition_of_band(
    band: npt.NDArray[np.uint32], key: npt.NDArray[np.uint64], n: int
) -> npt.NDArray[np.int64]:
    with np.errstate(over="ignore"):
        h = mix64(key ^ (band.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
    return (h % np.uint64(n)).astype(np.int64)


class _Partitions:
    """Per-partition record buffers, appended to ``<kind>-<p>.bin`` when they grow too large."""

    def __init__(self, out: Path, kind: str, n: int) -> None:
        self.paths = [out / f"{kind}-{p}.bin" for p in range(n)]
        for path in self.paths:
            path.touch()
        self.buffers: list[list[npt.NDArray[Any]]] = [[] for _ in range(n)]
        self.nbytes = 0

    def add(self, records: npt.NDArray[Any], parts: npt.NDArray[np.int64]) -> None:
        order = np.argsort(parts, kind="stable")
        parts, records = parts[order], records[order]
        cuts = np.flatnonzero(np.diff(parts)) + 1
        for lo, hi in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [parts.size])), strict=True):
            if hi > lo:
                self.buffers[int(parts[lo])].append(records[lo:hi])
        self.nbytes += records.nbytes
        if self.nbytes >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        for path, buf in zip(self.paths, self.buffers, strict=True):
            if buf:
                with open(path, "ab") as fh:
                    for part in buf:
                        fh.write(part.tobytes())
                buf.clear()
        self.nbytes = 0


class _Signatures:
    """A ``.npy`` written row by row."""

    def __init__(self, path: Path, num_perm: int) -> None:
        self.fh: BinaryIO = open(path, "wb")
        self.fh.write(b"\0" * _NPY_HEADER)
        self.num_perm, self.rows = num_perm, 0

    def add(self, sig: npt.NDArray[np.uint32]) -> None:
        self.fh.write(np.ascontiguousarray(sig, dtype="<u4").tobytes())
        self.rows += sig.shape[0]

    def close(self) -> None:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<u4", "fortran_order": False, "shape": (self.rows, self.num_perm)}
        )
        if len(header.getvalue()) != _NPY_HEADER:
            raise RuntimeError(f"unexpected .npy header size {len(header.getvalue())}")
        self.fh.seek(0)
        self.fh.write(header.getvalue())
        self.fh.close()


class _Scanner:
    def __init__(self, ctx: Context, index: int, out: Path) -> None:
        data = ctx.config.spec.data
        self.ctx, self.index, self.out = ctx, index, out
        self.cleaning, self.near, self.exact = (
            data.cleaning,
            data.deduplication.near,
            data.deduplication.exact,
        )
        self.bands, self.band_rows = lsh.optimal_bands(
            self.near.threshold, self.near.num_permutations, dedup.FP_WEIGHT, dedup.FN_WEIGHT
        )
        self.docs = open(out / "docs.jsonl", "w", encoding="utf-8")
        self.rows = open(out / "rows.bin", "wb")
        self.sigs = _Signatures(out / "signatures.npy", self.near.num_permutations)
        self.exact_parts = _Partitions(out, "exact", ctx.pods)
        self.band_parts = _Partitions(out, "bands", ctx.pods)
        self.kept = 0
        self.removed: Counter[str] = Counter()
        self.edits: Counter[str] = Counter()

    def batch(self, texts: list[str], sources: list[int], js: list[int]) -> None:
        kept_texts: list[str] = []
        kept_rows: list[tuple[int, int, int]] = []
        for text, s, j in zip(texts, sources, js, strict=True):
            cleaned, events = clean.clean(text, self.cleaning)
            for k, v in events.items():
                (self.removed if k.startswith("removed:") else self.edits)[k.removeprefix("removed:")] += v
            if cleaned is not None:
                kept_texts.append(cleaned)
                kept_rows.append((s, j, len(cleaned.encode())))
        if not kept_texts:
            return
        ords = (np.int64(self.index) << SHIFT) + self.kept + np.arange(len(kept_texts), dtype=np.int64)
        self.kept += len(kept_texts)
        self.docs.write("".join(json.dumps(t) + "\n" for t in kept_texts))
        self.rows.write(np.array(kept_rows, dtype=np.int64).tobytes())
        if self.exact:
            keys = np.frombuffer(b"".join(dedup.exact_key(t) for t in kept_texts), dtype="<u8").reshape(-1, 2)
            rec = np.empty(len(kept_texts), dtype=EXACT_DTYPE)
            rec["k0"], rec["k1"], rec["ord"] = keys[:, 0], keys[:, 1], ords
            self.exact_parts.add(rec, (keys[:, 0] % np.uint64(self.ctx.pods)).astype(np.int64))
        if self.near.enabled:
            sig = minhash.signatures(
                kept_texts, self.near.shingle_size, self.near.num_permutations, dedup.PERMUTATION_SEED
            )
            self.sigs.add(sig)
            # Documents without shingles take part in no bucket, as in lsh.candidate_pairs.
            valid = np.flatnonzero(sig[:, 0] != minhash.EMPTY)
            banded = sig[valid]
            for band in range(self.bands):
                key = lsh._band_keys(banded, band * self.band_rows, self.band_rows)
                rec = np.empty(valid.size, dtype=BAND_DTYPE)
                rec["band"], rec["key"], rec["ord"] = band, key, ords[valid]
                rec["ekey"] = keys[valid, 0] if self.exact else 0
                self.band_parts.add(rec, partition_of_band(rec["band"], key, self.ctx.pods))

    def close(self) -> None:
        self.exact_parts.flush()
        self.band_parts.flush()
        self.docs.close()
        self.rows.close()
        self.sigs.close()


def run(ctx: Context, index: int) -> dict[str, Any]:
    """Scans slice ``index``; returns the marker's statistics."""
    work = ctx.work
    pieces = slices.plan(ctx.sources, ctx.pods)[index]
    staging = work.begin(PreparePhase.SCAN, index)
    scanner = _Scanner(ctx, index, staging)
    reader: Counter[str] = Counter()
    per_source: Counter[int] = Counter()
    read = input_bytes = 0
    texts: list[str] = []
    srcs: list[int] = []
    js: list[int] = []
    pending = 0
    start = last = time.monotonic()
    for piece in pieces:
        for text in slices.read_piece(ctx.sources, piece, reader):
            texts.append(text)
            srcs.append(piece.source)
            js.append(per_source[piece.source])
            per_source[piece.source] += 1
            read += 1
            size = len(text.encode())
            input_bytes += size
            pending += size
            if len(texts) >= _BATCH_DOCS or pending >= _BATCH_BYTES:
                scanner.batch(texts, srcs, js)
                texts, srcs, js, pending = [], [], [], 0
                now = time.monotonic()
                if now - last >= PROGRESS_SECONDS:
                    last = now
                    log.info("scan %d: %d docs read, %.0f docs/s", index, read, read / (now - start))
    scanner.batch(texts, srcs, js)
    scanner.close()
    seconds = time.monotonic() - start
    log.info("scan %d: %d documents read, %d kept after cleaning (%.1fs)", index, read, scanner.kept, seconds)
    stats: dict[str, Any] = {
        "documents_read": read,
        "documents_kept": scanner.kept,
        "input_bytes": input_bytes,
        "per_source": {str(s): c for s, c in sorted(per_source.items())},
        "reader": dict(reader),
        "removed": dict(scanner.removed),
        "edits": dict(scanner.edits),
        "seconds": round(seconds, 3),
        "results": {"documentsRead": read, "documentsKept": scanner.kept},
    }
    work.finish(PreparePhase.SCAN, index, staging, stats)
    return stats
