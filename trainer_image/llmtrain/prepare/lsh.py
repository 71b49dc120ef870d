"""Locality-sensitive hashing over MinHash signatures: bands, candidate pairs, verified clusters."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from llmtrain.prepare.minhash import EMPTY, Signatures, estimated_jaccard

# Buckets larger than this are chained instead of fully paired: a bucket of m documents has m^2/2
# pairs, and a pathological bucket (boilerplate-heavy crawl) must not turn candidate generation quadratic.
_MAX_FULL_BUCKET = 32


def _integrate(f: npt.NDArray[np.float64], xs: npt.NDArray[np.float64]) -> float:
    return float(np.sum((f[1:] + f[:-1]) * np.diff(xs)) / 2.0)


def optimal_bands(
    threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) minimising the weighted false-positive and false-negative areas of the S-curve.

    The same criterion as datasketch's ``_optimal_param``: P(candidate | s) = 1 - (1 - s^r)^b, false
    positives integrate it below the threshold and false negatives integrate its complement above.
    """
    lo = np.linspace(0.0, threshold, 201)
    hi = np.linspace(threshold, 1.0, 201)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _integrate(1.0 - (1.0 - lo**r) ** b, lo)
            fn = _integrate((1.0 - hi**r) ** b, hi)
            err = fp * fp_weight + fn * fn_weight
            if err < best_err:
                best, best_err = (b, r), err
    return best


def _band_keys(sig: Signatures, start: int, rows: int) -> npt.NDArray[np.uint64]:
    key = np.zeros(sig.shape[0], dtype=np.uint64)
    for col in range(start, start + rows):
        key = key * np.uint64(0x100000001B3) + sig[:, col].astype(np.uint64)
    return key


def candidate_pairs(sig: Signatures, bands: int, rows: int) -> npt.NDArray[np.int64]:
    """Unique (i, j) index pairs, i < j, that share at least one band; shape (pairs, 2)."""
    valid = np.flatnonzero(sig[:, 0] != EMPTY) if sig.shape[0] else np.empty(0, dtype=np.int64)
    chunks: list[npt.NDArray[np.int64]] = []
    for band in range(bands):
        keys = _band_keys(sig[valid], band * rows, rows)
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        # Runs of equal keys are buckets; only runs of two or more yield pairs.
        boundaries = np.flatnonzero(np.diff(sk)) + 1
        starts = np.concatenate(([0], boundaries))
        ends = np.concatenate((boundaries, [sk.size]))
        multi = np.flatnonzero(ends - starts > 1)
        if multi.size == 0:
            continue
        pair_size = ends[multi] - starts[multi] == 2
        twos = starts[multi[pair_size]]
        if twos.size:
            chunks.append(np.stack((valid[order[twos]], valid[order[twos + 1]]), axis=1))
        for s, e in zip(starts[multi[~pair_size]], ends[multi[~pair_size]], strict=True):
            members = valid[order[s:e]]
            if members.size <= _MAX_FULL_BUCKET:
                chunks.append(np.array(list(itertools.combinations(members, 2)), dtype=np.int64))
            else:
                chunks.append(np.stack((members[:-1], members[1:]), axis=1))
    if not chunks:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(chunks).astype(np.int64)
    pairs.sort(axis=1)
    return np.unique(pairs, axis=0)


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving; the smallest index is each set's root."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            # Keeping the smaller index as root makes "keep the root" keep the earliest document.
            if rx < ry:
                self.parent[ry] = rx
            else:
                self.parent[rx] = ry


@dataclass
class NearDupResult:
    """Outcome of near-duplicate detection over ``n`` documents."""

    keep: npt.NDArray[np.bool_]
    clusters: list[list[int]] = field(default_factory=list)
    """Clusters of two or more documents, each sorted; the first member is the one kept."""
    candidate_pairs: int = 0
    verified_pairs: int = 0
    bands: int = 0
    rows: int = 0

    @property
    def removed(self) -> int:
        return int((~self.keep).sum())


def cluster(sig: Signatures, threshold: float, bands: int, rows: int) -> NearDupResult:
    """Candidate pairs from LSH, kept when the signatures' estimated Jaccard reaches ``threshold``."""
    n = sig.shape[0]
    pairs = candidate_pairs(sig, bands, rows)
    est = estimated_jaccard(sig, pairs[:, 0], pairs[:, 1]) if pairs.size else np.empty(0)
    verified = pairs[est >= threshold]
    uf = UnionFind(n)
    for i, j in verified.tolist():
        uf.union(i, j)
    members: dict[int, list[int]] = {}
    for i in np.unique(verified).tolist():
        members.setdefault(uf.find(i), []).append(i)
    keep = np.ones(n, dtype=bool)
    clusters = [sorted(m) for _, m in sorted(members.items())]
    for c in clusters:
        keep[c[1:]] = False
    return NearDupResult(keep, clusters, int(pairs.shape[0]), int(verified.shape[0]), bands, rows)
