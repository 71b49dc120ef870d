"""Exact and near-duplicate detection, measured on the planted english-dups corpus."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from llmop_contract.api.v1alpha1.data import NearDuplicates
from llmtrain import corpus
from llmtrain.prepare import dedup, lsh, minhash, parallel
from llmtrain.prepare.shingles import shingle_strings

# Floors below what the pipeline measures on english-dups (precision 1.000, recall 0.989 at the
# default 5-word shingles, 128 permutations, threshold 0.8), leaving room for the estimator's noise.
PRECISION_FLOOR = 0.97
RECALL_FLOOR = 0.95


def _pairs(clusters: list[list[int]]) -> set[tuple[int, int]]:
    return {p for c in clusters for p in itertools.combinations(sorted(c), 2)}


def _true_clusters(records: list[dict[str, object]]) -> list[list[int]]:
    by: dict[object, list[int]] = {}
    for i, r in enumerate(records):
        by.setdefault(r["cluster"], []).append(i)
    return [c for c in by.values() if len(c) > 1]


def test_exact_dedup_ignores_case_and_whitespace() -> None:
    texts = ["The cat sat.", "the  cat\nsat.", "The cat sat!", "THE CAT SAT."]
    assert dedup.exact_keep(texts).tolist() == [True, False, True, False]


def test_exact_dedup_finds_every_planted_exact_copy() -> None:
    records = corpus.load("english-dups")
    keep = dedup.exact_keep([str(r["text"]) for r in records])
    exact_copies = [i for i, r in enumerate(records) if r["kind"] == "exact"]
    removed = set(np.flatnonzero(~keep).tolist())
    # Every exact copy or its original (whichever comes later in the shuffled corpus) is removed.
    clusters = {r["cluster"] for i, r in enumerate(records) if i in removed}
    assert {records[i]["cluster"] for i in exact_copies} <= clusters


def test_estimated_jaccard_tracks_true_jaccard() -> None:
    rng = random.Random(3)
    base = [
        rng.choice(["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta"]) + str(i % 50)
        for i in range(300)
    ]
    texts = [" ".join(base)]
    for k in (5, 20, 60):
        words = list(base)
        for _ in range(k):
            words[rng.randrange(len(words))] = "changed"
        texts.append(" ".join(words))
    sig = minhash.signatures(texts, 5, 256)
    for j in range(1, len(texts)):
        a, b = set(shingle_strings(texts[0], 5)), set(shingle_strings(texts[j], 5))
        true = len(a & b) / len(a | b)
        est = float((sig[0] == sig[j]).mean())
        assert abs(est - true) < 0.1, (true, est)


def test_batched_signatures_equal_one_at_a_time() -> None:
    texts = [str(r["text"]) for r in corpus.load("english")[:40]] + ["", "one"]
    batch = minhash.signatures(texts, 5, 64)
    single = np.concatenate([minhash.signatures([t], 5, 64) for t in texts])
    assert np.array_equal(batch, single)
    assert (batch[-2] == minhash.EMPTY).all() and not (batch[-1] == minhash.EMPTY).all()


def test_band_choice_matches_datasketch() -> None:
    from datasketch import lsh as datasketch_lsh  # a dev dependency: missing it fails, never skips

    for threshold, num_perm in ((0.8, 128), (0.5, 64), (0.9, 256)):
        ours = lsh.optimal_bands(threshold, num_perm)
        theirs = datasketch_lsh._optimal_param(threshold, num_perm, 0.5, 0.5)
        assert ours == tuple(theirs), (threshold, num_perm)


def test_near_dedup_precision_and_recall_on_planted_corpus() -> None:
    records = corpus.load("english-dups")
    texts = [str(r["text"]) for r in records]
    res = dedup.near_duplicates(texts, NearDuplicates(), num_workers=1)
    true, pred = _pairs(_true_clusters(records)), _pairs(res.clusters)
    tp = len(true & pred)
    precision, recall = tp / max(len(pred), 1), tp / max(len(true), 1)
    print(
        f"near-dup pairs: true {len(true)} predicted {len(pred)} precision {precision:.3f} recall {recall:.3f}"
    )
    assert precision >= PRECISION_FLOOR
    assert recall >= RECALL_FLOOR
    # No hard negative (a far copy, Jaccard < 0.7 to its original) may be merged with its original.
    far = {i for i, r in enumerate(records) if r["kind"] == "far"}
    for c in res.clusters:
        if far & set(c):
            assert len({records[i]["cluster"] for i in c}) == 1
    # Exactly one document per predicted cluster survives.
    assert res.removed == sum(len(c) - 1 for c in res.clusters)
    assert all(res.keep[c[0]] and not res.keep[c[1:]].any() for c in res.clusters)


def test_near_dedup_is_independent_of_worker_count(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [str(r["text"]) for r in corpus.load("english-dups")[:600]]
    serial = dedup.near_duplicates(texts, NearDuplicates(), num_workers=1)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ITEMS", 0)
    pooled = dedup.near_duplicates(texts, NearDuplicates(), num_workers=2)
    assert serial.clusters == pooled.clusters


def test_union_find_keeps_smallest_index() -> None:
    uf = lsh.UnionFind(6)
    for a, b in ((5, 3), (3, 4), (1, 2)):
        uf.union(a, b)
    assert [uf.find(i) for i in range(6)] == [0, 1, 1, 3, 3, 3]


def test_oversized_bucket_is_chained_not_squared() -> None:
    sig = np.tile(np.arange(16, dtype=np.uint32), (100, 1))  # 100 identical signatures
    pairs = lsh.candidate_pairs(sig, 4, 4)
    assert len(pairs) == 99
    res = lsh.cluster(sig, 0.8, 4, 4)
    assert res.clusters == [list(range(100))]
