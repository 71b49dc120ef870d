"""Exact and near-duplicate removal over a list of documents."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from llmop_contract.api.v1alpha1.data import NearDuplicates
from llmtrain.prepare import lsh, minhash
from llmtrain.prepare.parallel import map_chunks

# LSH only proposes candidates; every candidate is verified against the threshold, so the band
# layout can favour recall (false negatives weigh 0.8) and let verification restore precision.
FP_WEIGHT, FN_WEIGHT = 0.2, 0.8
PERMUTATION_SEED = 1


def exact_key(text: str) -> bytes:
    """Digest of the text with case and whitespace runs normalised away."""
    return hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).digest()


def exact_keep(texts: Sequence[str]) -> npt.NDArray[np.bool_]:
    """True for the first occurrence of every normalised text."""
    seen: set[bytes] = set()
    keep = np.zeros(len(texts), dtype=bool)
    for i, text in enumerate(texts):
        key = exact_key(text)
        if key not in seen:
            seen.add(key)
            keep[i] = True
    return keep


def _signature_chunk(texts: Sequence[str], shingle_size: int, num_perm: int) -> minhash.Signatures:
    return minhash.signatures(list(texts), shingle_size, num_perm, PERMUTATION_SEED)


def near_duplicates(texts: Sequence[str], cfg: NearDuplicates, num_workers: int = 1) -> lsh.NearDupResult:
    """MinHash-LSH clusters over ``texts``; the earliest document of each cluster is kept."""
    fn = functools.partial(_signature_chunk, shingle_size=cfg.shingle_size, num_perm=cfg.num_permutations)
    parts = list(map_chunks(fn, texts, num_workers, "minhash", chunk_size=1000))
    sig = np.concatenate(parts) if parts else np.empty((0, cfg.num_permutations), dtype=np.uint32)
    bands, rows = lsh.optimal_bands(cfg.threshold, cfg.num_permutations, FP_WEIGHT, FN_WEIGHT)
    return lsh.cluster(sig, cfg.threshold, bands, rows)
