"""MinHash signatures computed for many documents at once in numpy.

Each permutation is a multiply-add-shift hash ``((a*x + b) mod 2^64) >> 32`` with random 64-bit odd
``a`` and random ``b``: it is strongly universal for 32-bit ``x`` and needs no modulo, which is the most
expensive numpy integer op (datasketch's ``mod 2^61-1`` costs about as much as the rest together).
Shingle hashes of a whole batch of documents are concatenated and evaluated as one
``(num_perm x shingles)`` block in cache-sized column chunks; ``np.minimum.reduceat`` then takes each
document's minimum over its own column span.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from llmtrain.prepare.shingles import ShingleHasher

Signatures = npt.NDArray[np.uint32]
EMPTY = np.uint32(0xFFFFFFFF)
# Columns per block: 128 permutations x 4096 shingles x 8 bytes = 4 MiB, which stays in L2/L3.
_BLOCK_ELEMENTS = 1 << 19


def permutations(num_perm: int, seed: int = 1) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """The (a, b) coefficients of ``num_perm`` hash functions, fixed by ``seed`` for reproducibility."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)
    return a, b


def signatures_from_hashes(
    shingle_sets: list[npt.NDArray[np.uint32]], num_perm: int, seed: int = 1
) -> Signatures:
    """``(len(shingle_sets), num_perm)`` uint32 signatures; a document without shingles gets all ``EMPTY``."""
    lengths = np.fromiter((len(s) for s in shingle_sets), dtype=np.int64, count=len(shingle_sets))
    flat = np.concatenate(shingle_sets) if shingle_sets else np.empty(0, dtype=np.uint32)
    return signatures_from_flat(flat, lengths, num_perm, seed)


def signatures_from_flat(
    shingles: npt.NDArray[np.uint32], lengths: npt.NDArray[np.int64], num_perm: int, seed: int = 1
) -> Signatures:
    """Signatures of documents whose shingle hashes lie end to end in ``shingles``, ``lengths[i]``
    of them for document i."""
    n = lengths.size
    sig = np.full((n, num_perm), EMPTY, dtype=np.uint32)
    if n == 0:
        return sig
    a, b = permutations(num_perm, seed)
    a_col, b_col = a[:, None], b[:, None]
    nonempty = np.flatnonzero(lengths)
    if nonempty.size == 0:
        return sig
    flat = shingles.astype(np.uint64)
    starts = np.zeros(nonempty.size, dtype=np.int64)
    np.cumsum(lengths[nonempty][:-1], out=starts[1:])
    ends = starts + lengths[nonempty]

    block_cols = max(_BLOCK_ELEMENTS // num_perm, 1)
    buf = np.empty((num_perm, block_cols), dtype=np.uint64)
    out = sig[nonempty]
    # Walk column blocks; a document may straddle blocks, so each block min-reduces the document
    # segments it overlaps and folds them into the running minimum.
    doc = 0
    total = flat.size
    for lo in range(0, total, block_cols):
        hi = min(lo + block_cols, total)
        width = hi - lo
        blk = buf[:, :width]
        np.multiply(a_col, flat[lo:hi][None, :], out=blk)
        np.add(blk, b_col, out=blk)
        first = doc
        while doc < nonempty.size and ends[doc] <= hi:
            doc += 1
        last = doc if doc < nonempty.size and starts[doc] < hi else doc - 1
        seg_docs = np.arange(first, last + 1)
        seg_starts = np.maximum(starts[seg_docs], lo) - lo
        # x -> x >> 32 is monotone, so the shift of the minimum is the minimum of the shifts: one
        # pass over the reduced minima instead of over the whole block.
        mins = (np.minimum.reduceat(blk, seg_starts, axis=1).T >> np.uint64(32)).astype(np.uint32)
        np.minimum(out[seg_docs], mins, out=mins)
        out[seg_docs] = mins
    sig[nonempty] = out
    return sig


def signatures(texts: list[str], shingle_size: int, num_perm: int, seed: int = 1) -> Signatures:
    """Signatures of raw texts (shingling included); the unit of work handed to a worker process."""
    flat, lengths = ShingleHasher(shingle_size).batch(texts)
    return signatures_from_flat(flat, lengths, num_perm, seed)


def estimated_jaccard(
    sig: Signatures, left: npt.NDArray[np.int64], right: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    """Fraction of agreeing signature slots for each (left[i], right[i]) pair, in bounded-memory chunks."""
    est = np.empty(left.size, dtype=np.float64)
    step = 65536
    for lo in range(0, left.size, step):
        hi = lo + step
        est[lo:hi] = (sig[left[lo:hi]] == sig[right[lo:hi]]).mean(axis=1)
    return est
