"""Corpora bundled with the trainer, readable as ``builtin://NAME``.

``english``
    About 2,300 real English documents (2.1 MB): Python reference topics, standard-library docstrings
    and licence texts; see ``build_corpus.py`` for how it is made. No document is a near-duplicate of
    another (shingle Jaccard < 0.5).
``english-dups``
    ``english`` plus planted duplicates, generated deterministically at load time with ground truth:
    every record carries ``cluster`` (records sharing it are duplicates of each other) and ``kind``
    (``original``, ``exact`` copy differing only in case and whitespace, ``near`` copy with a few words
    changed, inserted or deleted so the true 5-shingle Jaccard to its original is at least 0.85, or
    ``far`` copy rewritten so its Jaccard is below 0.7: a hard negative with its own cluster).
"""

from __future__ import annotations

import gzip
import json
import random
from functools import cache
from pathlib import Path
from typing import Any

from llmtrain.prepare.shingles import shingle_strings

ENGLISH = Path(__file__).with_name("english.jsonl.gz")
NAMES = ("english", "english-dups")
NEAR_MIN_JACCARD = 0.85
FAR_MAX_JACCARD = 0.7
_FILLER = "the of and a to in is that for it as with was on by this be are from or an at".split()


@cache
def _english() -> tuple[dict[str, str], ...]:
    with gzip.open(ENGLISH, "rt", encoding="utf-8") as fh:
        return tuple(json.loads(line) for line in fh)


def jaccard(a: str, b: str, shingle_size: int = 5) -> float:
    """Exact Jaccard similarity of two texts' word-shingle sets."""
    sa, sb = set(shingle_strings(a, shingle_size)), set(shingle_strings(b, shingle_size))
    return len(sa & sb) / max(len(sa | sb), 1)


def _edit(text: str, edits: int, rng: random.Random, vocab: list[str]) -> str:
    words = text.split(" ")
    for _ in range(edits):
        op = rng.choice(("replace", "insert", "delete"))
        i = rng.randrange(len(words))
        if op == "replace":
            words[i] = rng.choice(vocab)
        elif op == "insert":
            words.insert(i, rng.choice(vocab))
        elif len(words) > 1:
            del words[i]
    return " ".join(words)


def _exact_copy(text: str, rng: random.Random) -> str:
    # Differs only in what exact dedup normalises away: letter case and runs of whitespace.
    out = text.upper() if rng.random() < 0.5 else text.lower()
    return "  ".join(out.split(" ")) if rng.random() < 0.5 else out + "\n"


def plant_duplicates(
    docs: list[dict[str, str]], seed: int = 0, shingle_size: int = 5
) -> list[dict[str, Any]]:
    """Originals plus exact, near and far copies, shuffled, with cluster labels (see module doc)."""
    rng = random.Random(seed)
    vocab = sorted({w for d in docs[:200] for w in d["text"].split() if w.isalpha()}) + _FILLER
    out: list[dict[str, Any]] = [
        {"id": d["id"], "text": d["text"], "cluster": i, "kind": "original"} for i, d in enumerate(docs)
    ]
    # Only documents long enough for a few edits to stay above the near-duplicate threshold.
    eligible = [i for i, d in enumerate(docs) if len(d["text"].split()) >= 100]
    picks = rng.sample(eligible, k=len(eligible) * 35 // 100)
    n_exact, n_near = len(picks) * 10 // 35, len(picks) * 20 // 35
    next_cluster = len(docs)
    for i in picks[:n_exact]:
        out.append(
            {
                "id": f"{docs[i]['id']}-exact",
                "text": _exact_copy(docs[i]["text"], rng),
                "cluster": i,
                "kind": "exact",
            }
        )
    for i in picks[n_exact : n_exact + n_near]:
        base = docs[i]["text"]
        for c in range(rng.choice((1, 1, 2))):
            edits = rng.randint(1, 4)
            copy = _edit(base, edits, rng, vocab)
            while edits > 1 and jaccard(base, copy, shingle_size) < NEAR_MIN_JACCARD:
                edits -= 1
                copy = _edit(base, edits, rng, vocab)
            if jaccard(base, copy, shingle_size) >= NEAR_MIN_JACCARD:
                out.append({"id": f"{docs[i]['id']}-near{c}", "text": copy, "cluster": i, "kind": "near"})
    for i in picks[n_exact + n_near :]:
        base = docs[i]["text"]
        n_words = len(base.split())
        copy = _edit(base, max(n_words // 8, 4), rng, vocab)
        if jaccard(base, copy, shingle_size) < FAR_MAX_JACCARD:
            out.append({"id": f"{docs[i]['id']}-far", "text": copy, "cluster": next_cluster, "kind": "far"})
            next_cluster += 1
    rng.shuffle(out)
    return out


@cache
def _english_dups() -> tuple[dict[str, Any], ...]:
    return tuple(plant_duplicates(list(_english())))


def load(name: str) -> list[dict[str, Any]]:
    """Records of a bundled corpus; each has at least ``id`` and ``text``."""
    if name == "english":
        return [dict(d) for d in _english()]
    if name == "english-dups":
        return [dict(d) for d in _english_dups()]
    raise KeyError(f"unknown builtin corpus {name!r}; bundled: {', '.join(NAMES)}")
