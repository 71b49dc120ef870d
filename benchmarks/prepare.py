"""Near-duplicate detection: llmtrain.prepare vs datasketch MinHash-LSH vs datatrove MinHash dedup.

All three see the same documents and the same shingles (5-word shingles from
``llmtrain.prepare.shingles``), the same number of hashes and the same threshold. The corpus is
``builtin://english-dups`` replicated ``--replicas`` times; each replica suffixes every word with a
replica tag, so replicas share no shingle and the planted ground truth (cluster labels) stays exact.

Quality is pair-level precision and recall over the final clusters (every pair of documents in a
predicted cluster vs every pair in a planted cluster). Timings cover shingling, hashing, banding and
clustering, i.e. everything from texts to duplicate clusters.

    python benchmarks/prepare.py [--replicas 10] [--workers 0]

The last line is ``prepare speedup vs datasketch: X`` (datasketch seconds / our seconds).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / p) for p in ("operator", "trainer_image")]

from llmop_contract.api.v1alpha1.data import NearDuplicates  # noqa: E402
from llmtrain import corpus  # noqa: E402
from llmtrain.prepare import dedup, lsh, parallel  # noqa: E402
from llmtrain.prepare.shingles import shingle_strings  # noqa: E402

Clusters = list[list[int]]


def build_corpus(replicas: int) -> tuple[list[str], list[tuple[int, Any]]]:
    records = corpus.load("english-dups")
    texts: list[str] = []
    labels: list[tuple[int, Any]] = []
    for r in range(replicas):
        tag = "" if r == 0 else "q" + "".join(chr(97 + int(d)) for d in str(r))
        for rec in records:
            text = str(rec["text"])
            texts.append(re.sub(r"\w+", lambda m, t=tag: m.group(0) + t, text) if tag else text)
            labels.append((r, rec["cluster"]))
    return texts, labels


def pair_set(clusters: Clusters) -> set[tuple[int, int]]:
    return {p for c in clusters for p in itertools.combinations(sorted(c), 2)}


def quality(pred: Clusters, truth: Clusters) -> tuple[float, float]:
    p, t = pair_set(pred), pair_set(truth)
    tp = len(p & t)
    return tp / max(len(p), 1), tp / max(len(t), 1)


def clusters_from_pairs(n: int, pairs: Iterator[tuple[int, int]]) -> Clusters:
    uf = lsh.UnionFind(n)
    for a, b in pairs:
        uf.union(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def run_ours(texts: list[str], cfg: NearDuplicates, workers: int) -> Clusters:
    return dedup.near_duplicates(texts, cfg, num_workers=workers).clusters


def run_datasketch(texts: list[str], cfg: NearDuplicates) -> Clusters:
    from datasketch import MinHash, MinHashLSH

    # bulk() is datasketch's fastest path: one vectorised update per document.
    shingles = [[s.encode() for s in shingle_strings(t, cfg.shingle_size)] for t in texts]
    mhs = MinHash.bulk(shingles, num_perm=cfg.num_permutations)
    index = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_permutations)
    with index.insertion_session() as session:
        for i, m in enumerate(mhs):
            session.insert(i, m)
    pairs = ((i, j) for i, m in enumerate(mhs) for j in index.query(m) if j != i)
    return clusters_from_pairs(len(texts), pairs)


def run_datatrove(texts: list[str], cfg: NearDuplicates, workers: int, bands: int, rows: int) -> Clusters:
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import minhash as dt_minhash
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupSignature,
    )
    from loguru import logger

    logger.remove()
    # The signature step loads a spaCy word tokenizer in __init__ even though get_shingles below
    # never uses it; spaCy is not installed here, so hand it nothing.
    dt_minhash.load_word_tokenizer = lambda *_a, **_k: None

    class SameShingles(MinhashDedupSignature):  # type: ignore[misc]
        # datatrove's English word tokenizer needs spaCy; feeding it our shingles also makes the
        # comparison about the dedup machinery, not about tokenisation.
        def get_shingles(self, text: str) -> np.ndarray[Any, Any]:
            sh = shingle_strings(text, cfg.shingle_size)
            return np.fromiter(
                (self._hash_func(s.encode()) for s in sh), dtype=np.uint64, count=len(sh)
            ).reshape((-1, 1))

    tasks = max(workers, 1)
    bounds = np.linspace(0, len(texts), tasks + 1).astype(int)

    def reader(_: Any, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for i in range(bounds[rank], bounds[rank + 1]):
            yield Document(text=texts[i], id=str(i))

    mh = MinhashConfig(n_grams=cfg.shingle_size, num_buckets=bands, hashes_per_bucket=rows)
    with tempfile.TemporaryDirectory() as tmp:
        logs = f"{tmp}/logs"

        def execute(pipeline: list[Any], n: int, name: str) -> None:
            LocalPipelineExecutor(
                pipeline=pipeline,
                tasks=n,
                workers=min(n, tasks),
                logging_dir=f"{logs}/{name}",
                start_method="fork",
            ).run()

        execute([reader, SameShingles(output_folder=f"{tmp}/sigs", config=mh)], tasks, "sigs")
        execute(
            [MinhashDedupBuckets(input_folder=f"{tmp}/sigs", output_folder=f"{tmp}/buckets", config=mh)],
            bands,
            "buckets",
        )
        execute(
            [
                MinhashDedupCluster(
                    input_folder=f"{tmp}/buckets", output_folder=f"{tmp}/ids", config=mh, save_cluster_id=True
                )
            ],
            1,
            "cluster",
        )
        groups: dict[int, list[int]] = {}
        for rank in range(tasks):
            path = Path(tmp, "ids", f"{rank:06d}.clusters")
            if not path.exists():
                continue
            raw = path.read_bytes()
            for doc, cid in struct.iter_unpack("<II", raw):
                groups.setdefault(cid, []).append(int(bounds[rank]) + doc)
    return [g for g in groups.values() if len(g) > 1]


def timed(fn: Callable[[], Clusters]) -> tuple[Clusters, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=10)
    ap.add_argument("--workers", type=int, default=0, help="processes for ours and datatrove; 0 = every core")
    ap.add_argument("--skip-datatrove", action="store_true")
    args = ap.parse_args()
    workers = parallel.workers(args.workers)
    cfg = NearDuplicates()
    texts, labels = build_corpus(args.replicas)
    by_label: dict[tuple[int, Any], list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    truth = [c for c in by_label.values() if len(c) > 1]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(
        f"corpus: english-dups x{args.replicas} = {len(texts)} docs, {mb:.1f} MB, {len(truth)} planted clusters; "
        f"shingles {cfg.shingle_size} words, {cfg.num_permutations} hashes, threshold {cfg.threshold}; "
        f"{workers} worker(s) on {os.cpu_count()} cores"
    )
    ds_bands, ds_rows = lsh.optimal_bands(cfg.threshold, cfg.num_permutations)

    results: list[tuple[str, float, float, float]] = []

    def report(name: str, clusters: Clusters, seconds: float) -> None:
        precision, recall = quality(clusters, truth)
        results.append((name, seconds, precision, recall))
        print(
            f"{name:<28} {seconds:8.2f} s {len(texts) / seconds:9.0f} docs/s {mb / seconds:7.2f} MB/s "
            f"precision {precision:.4f} recall {recall:.4f} clusters {len(clusters)}",
            flush=True,
        )

    ours, t_ours = timed(lambda: run_ours(texts, cfg, workers))
    report(f"llmtrain ({workers} workers)", ours, t_ours)
    if workers > 1:
        one, t_one = timed(lambda: run_ours(texts, cfg, 1))
        report("llmtrain (1 worker)", one, t_one)
    ds, t_ds = timed(lambda: run_datasketch(texts, cfg))
    report("datasketch MinHashLSH", ds, t_ds)
    if args.skip_datatrove:
        print("datatrove: skipped (--skip-datatrove)")
    else:
        try:
            import datatrove  # noqa: F401
        except ImportError as exc:
            print(f"datatrove: skipped, not importable ({exc}); `uv pip install datatrove` to include it")
        else:
            try:
                dt, t_dt = timed(lambda: run_datatrove(texts, cfg, workers, ds_bands, ds_rows))
            except ImportError as exc:  # its MinHash needs xxhash, an optional extra
                print(f"datatrove: skipped, a dependency is missing ({exc})")
            else:
                report(f"datatrove ({workers} tasks)", dt, t_dt)
                print(f"prepare speedup vs datatrove: {t_dt / t_ours:.2f}")
    print(f"prepare speedup vs datasketch: {t_ds / t_ours:.2f}")


if __name__ == "__main__":
    main()
