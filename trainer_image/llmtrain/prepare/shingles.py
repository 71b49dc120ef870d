"""Word shingles and their 32-bit hashes: the shared vocabulary of exact and near-duplicate detection.

The same function defines shingles for our MinHash, for the ground truth of the planted corpus and for
the datasketch/datatrove baselines in the benchmark, so every method compares the same sets.
"""

from __future__ import annotations

import itertools
import re
import zlib

import numpy as np
import numpy.typing as npt

_WORD = re.compile(r"\w+")
# Odd 64-bit multiplier for the rolling combination of word hashes into a shingle hash.
_ROLL = np.uint64(0x9E3779B97F4A7C15)
# Words whose hashes a hasher keeps: bounds memory on corpora with unbounded vocabularies.
_CACHE_WORDS = 2_000_000


def words(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation and whitespace never affect shingles."""
    return _WORD.findall(text.lower())


# bytes.translate table: ASCII letters, digits and "_" (what \w matches among ASCII characters) are
# kept, every other byte becomes a space.
_ASCII_WORDS = bytes(b if b < 128 and (chr(b).isalnum() or b == 0x5F) else 0x20 for b in range(256))


def word_bytes(text: str) -> list[bytes]:
    """``words(text)`` as UTF-8 bytes. An ASCII text (most of any English corpus) is lower-cased,
    cut and split as bytes, which finds the same words as the regex about 2.5x faster."""
    if text.isascii():
        return text.encode("ascii").lower().translate(_ASCII_WORDS).split()
    return [w.encode() for w in words(text)]


def _crc32_table() -> npt.NDArray[np.uint32]:
    """zlib's crc32 table (reflected polynomial 0xEDB88320), one entry per byte value."""
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> np.uint32(1)) ^ np.uint32(0xEDB88320), t >> np.uint32(1))
    return t


_CRC32 = _crc32_table()
# Words longer than this are hashed by zlib one at a time (rare), which bounds the numpy loop below.
_LONG_WORD = 40


def ascii_word_hashes(texts: list[str]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """``zlib.crc32(word) + 1`` of every word of ASCII ``texts`` end to end (the words of
    ``word_bytes``), and how many words each text has.

    The texts are lower-cased and cut as one byte string; crc32 runs byte position by byte position
    over all words at once (longest first, so the words still running are a prefix), which replaces
    a Python object, a dict lookup and a zlib call per word by a few numpy passes per batch.
    """
    lens_docs = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    joined = " ".join(texts).encode("ascii").lower().translate(_ASCII_WORDS)
    buf = np.frombuffer(joined, dtype=np.uint8)
    edges = np.flatnonzero(np.diff((buf != 0x20).view(np.int8), prepend=0, append=0))
    starts, ends = edges[0::2], edges[1::2]
    doc_starts = np.cumsum(lens_docs + 1) - (lens_docs + 1)
    counts = np.diff(np.searchsorted(starts, np.append(doc_starts, buf.size))).astype(np.int64)
    lens = ends - starts
    order = np.argsort(np.minimum(lens, 255).astype(np.uint8), kind="stable")[::-1]
    sl, st = lens[order], starts[order]
    crc = np.empty(starts.size, dtype=np.uint32)
    n_long = int(np.count_nonzero(sl > _LONG_WORD))
    for i in range(n_long):
        crc[order[i]] = zlib.crc32(joined[st[i] : st[i] + sl[i]])
    sl, st = sl[n_long:], st[n_long:]
    c = np.full(sl.size, 0xFFFFFFFF, dtype=np.uint32)
    # running[k]: how many words are longer than k bytes (a prefix, as ``sl`` is descending).
    running = sl.size - np.cumsum(np.bincount(sl, minlength=_LONG_WORD + 1))
    for k in range(int(sl[0]) if sl.size else 0):
        m = int(running[k])
        ck = c[:m]
        c[:m] = _CRC32[(ck ^ buf[st[:m] + k]) & np.uint32(0xFF)] ^ (ck >> np.uint32(8))
    crc[order[n_long:]] = c ^ np.uint32(0xFFFFFFFF)
    return crc.astype(np.uint64) + np.uint64(1), counts


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

    A word's hash is crc32 of its UTF-8 bytes, plus one: for the ASCII texts of a batch computed for
    all their words at once in numpy (``ascii_word_hashes``), for the others once per distinct word
    (cached by the hasher, because words repeat far more than shingles do). Shingle hashes are then
    a rolling combination of ``size`` word hashes computed in numpy and finished with a splitmix64
    avalanche so the low and high bits are both usable.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._cache: dict[bytes, int] = {}

    def _table(self, toks: list[bytes]) -> dict[bytes, int]:
        """A word -> hash table holding every word of ``toks``: the cache, or, once the cache is
        full, a table of the words it lacks beside the ones it has."""
        cache = self._cache
        distinct = set(toks)
        new = distinct.difference(cache)
        if not new:
            return cache
        # crc32 + 1: the word hashes every signature so far was built from.
        hashed = {w: zlib.crc32(w) + 1 for w in new}
        room = _CACHE_WORDS - len(cache)
        if len(hashed) <= room:
            cache.update(hashed)
            return cache
        cache.update(itertools.islice(hashed.items(), max(room, 0)))
        hashed.update((w, cache[w]) for w in distinct - new)
        return hashed

    def _word_hashes(self, toks: list[bytes]) -> npt.NDArray[np.uint64]:
        table = self._table(toks)
        return np.fromiter(map(table.__getitem__, toks), dtype=np.uint64, count=len(toks))

    def hashes(self, text: str) -> npt.NDArray[np.uint32]:
        """Unique uint32 shingle hashes of ``text`` (empty for a document without words)."""
        toks = word_bytes(text)
        if not toks:
            return np.empty(0, dtype=np.uint32)
        wh = self._word_hashes(toks)
        n = max(len(toks) - self.size + 1, 1)
        acc = np.zeros(n, dtype=np.uint64)
        for j in range(min(self.size, len(toks))):
            acc = acc * _ROLL + wh[j : j + n]
        return np.unique(_mix32(acc))

    def _batch_word_hashes(self, texts: list[str]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
        """The hashes of every word of ``texts`` end to end, and each text's word count: ASCII texts
        all at once in numpy (``ascii_word_hashes``), the others word by word."""
        ascii_texts = [t.isascii() for t in texts]
        if all(ascii_texts):
            return ascii_word_hashes(texts)
        where = np.array(ascii_texts, dtype=bool)
        wa, ca = ascii_word_hashes([t for t, a in zip(texts, ascii_texts, strict=True) if a])
        toks = [word_bytes(t) for t, a in zip(texts, ascii_texts, strict=True) if not a]
        cn = np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))
        wn = self._word_hashes(list(itertools.chain.from_iterable(toks)))
        counts = np.empty(len(texts), dtype=np.int64)
        counts[where], counts[~where] = ca, cn
        offsets = np.cumsum(counts) - counts
        wh = np.empty(int(counts.sum()), dtype=np.uint64)
        for part, c, docs in ((wa, ca, where), (wn, cn, ~where)):
            # Each word's place: its place in its part, moved by its document's offset difference.
            wh[np.arange(part.size) + np.repeat(offsets[docs] - (np.cumsum(c) - c), c)] = part
        return wh, counts

    def batch(self, texts: list[str]) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.int64]]:
        """Every document's shingle hashes end to end, and how many each has: the same values as
        ``hashes`` (each document's, repeats kept: a MinHash minimum does not change with them) in
        a handful of numpy calls per batch instead of several per document, which on short
        documents cost more than the hashing itself."""
        wh, counts = self._batch_word_hashes(texts)
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
