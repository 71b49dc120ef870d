"""Word shingles and their 32-bit hashes: the shared vocabulary of exact and near-duplicate detection.

The same function defines shingles for our MinHash, for the ground truth of the planted corpus and for
the datasketch/datatrove baselines in the benchmark, so every method compares the same sets.
"""

from __future__ import annotations

import re
import zlib

import numpy as np
import numpy.typing as npt

_WORD = re.compile(r"\w+")
# Odd 64-bit multiplier for the rolling combination of word hashes into a shingle hash.
_ROLL = np.uint64(0x9E3779B97F4A7C15)


def words(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation and whitespace never affect shingles."""
    return _WORD.findall(text.lower())


def shingle_strings(text: str, size: int) -> list[str]:
    """Distinct space-joined word n-grams (a document shorter than ``size`` is one shingle)."""
    toks = words(text)
    if not toks:
        return []
    if len(toks) <= size:
        return [" ".join(toks)]
    return list(dict.fromkeys(" ".join(toks[i : i + size]) for i in range(len(toks) - size + 1)))


class ShingleHasher:
    """Hashes a document's shingles to uint32 without a Python call per shingle.

    Each word is hashed once (crc32, cached per process because words repeat far more than shingles
    do); shingle hashes are then a rolling combination of ``size`` word hashes computed in numpy and
    finished with a splitmix64 avalanche so the low and high bits are both usable.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._cache: dict[str, int] = {}

    def _miss(self, word: str) -> int:
        # +1 keeps every word hash non-zero, so `get(w) or miss(w)` below never re-hashes a word.
        h = zlib.crc32(word.encode()) + 1
        if len(self._cache) < 2_000_000:  # bound memory on corpora with unbounded vocabularies
            self._cache[word] = h
        return h

    def _word_hashes(self, toks: list[str]) -> npt.NDArray[np.uint64]:
        get, miss = self._cache.get, self._miss
        return np.array([get(w) or miss(w) for w in toks], dtype=np.uint64)

    def hashes(self, text: str) -> npt.NDArray[np.uint32]:
        """Unique uint32 shingle hashes of ``text`` (empty for a document without words)."""
        toks = words(text)
        if not toks:
            return np.empty(0, dtype=np.uint32)
        wh = self._word_hashes(toks)
        n = max(len(toks) - self.size + 1, 1)
        acc = np.zeros(n, dtype=np.uint64)
        for j in range(min(self.size, len(toks))):
            acc = acc * _ROLL + wh[j : j + n]
        return np.unique(_mix32(acc))

    def batch(self, texts: list[str]) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.int64]]:
        """Every document's shingle hashes end to end, and how many each has: the same values as
        ``hashes`` (each document's, repeats kept: a MinHash minimum does not change with them) in
        a handful of numpy calls per batch instead of several per document, which on short
        documents cost more than the hashing itself."""
        toks = [words(t) for t in texts]
        counts = np.fromiter((len(t) for t in toks), dtype=np.int64, count=len(toks))
        get, miss = self._cache.get, self._miss
        wh = np.fromiter(
            (get(w) or miss(w) for doc in toks for w in doc), dtype=np.uint64, count=int(counts.sum())
        )
        size = self.size
        # A window of `size` words at every position (zeros past the end, never selected below).
        padded = np.concatenate([wh, np.zeros(size - 1, dtype=np.uint64)])
        acc = np.zeros(wh.size, dtype=np.uint64)
        for j in range(size):
            acc = acc * _ROLL + padded[j : j + wh.size]
        starts = np.cumsum(counts) - counts
        position = np.arange(wh.size) - np.repeat(starts, counts)
        keep = position <= np.repeat(counts - size, counts)
        lengths = np.where(counts >= size, counts - size + 1, np.minimum(counts, 1))
        flat = _mix32(acc[keep])
        short = np.flatnonzero((counts > 0) & (counts < size))
        if short.size:
            # Fewer words than a shingle: one shingle of them all, hashed as ``hashes`` does.
            # Its slot in ``flat`` (which has none for it yet) is its offset less the short ones before it.
            offsets = np.cumsum(lengths) - lengths
            parts, at = [], 0
            for k, d in enumerate(short):
                cut = int(offsets[d]) - k
                parts += [flat[at:cut], self.hashes(texts[d])]
                at = cut
            flat = np.concatenate([*parts, flat[at:]])
        return flat, lengths


def _mix32(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint32]:
    """splitmix64 finaliser, keeping the top 32 bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(32)).astype(np.uint32)
