"""Seeded word- and character-level noise for augmented copies of training documents.

Each copy's random stream is derived from (seed, document text, copy number), not from a shared
generator, so the output does not depend on document order or on how work is split across processes.
"""

from __future__ import annotations

import hashlib
import random
import string
from pathlib import Path

from llmop_contract.api.v1alpha1.data import Augmentation

Thesaurus = dict[str, list[str]]


def load_thesaurus(path: str) -> Thesaurus:
    """``word<TAB>synonym,synonym`` per line; words are matched case-insensitively."""
    out: Thesaurus = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if "\t" not in line or line.startswith("#"):
            continue
        word, syns = line.split("\t", 1)
        choices = [s.strip() for s in syns.split(",") if s.strip()]
        if word.strip() and choices:
            out.setdefault(word.strip().lower(), []).extend(choices)
    return out


def _rng(seed: int, text: str, copy: int) -> random.Random:
    digest = hashlib.blake2b(f"{seed}:{copy}:".encode() + text.encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 2:
        return word
    i = rng.randrange(len(word))
    op = rng.randrange(4)
    letter = rng.choice(string.ascii_lowercase)
    if op == 0:  # substitute
        return word[:i] + letter + word[i + 1 :]
    if op == 1:  # insert
        return word[:i] + letter + word[i:]
    if op == 2:  # delete
        return word[:i] + word[i + 1 :]
    j = min(i + 1, len(word) - 1)  # transpose neighbours
    chars = list(word)
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def _synonym(word: str, thesaurus: Thesaurus, rng: random.Random) -> str:
    core = word.strip(string.punctuation)
    choices = thesaurus.get(core.lower())
    if not core or not choices:
        return word
    syn = rng.choice(choices)
    if core[0].isupper():
        syn = syn[:1].upper() + syn[1:]
    return word.replace(core, syn, 1)


def augment_line(words: list[str], cfg: Augmentation, thesaurus: Thesaurus, rng: random.Random) -> list[str]:
    out = [w for w in words if rng.random() >= cfg.word_dropout] if cfg.word_dropout else list(words)
    if cfg.synonym_replacement and thesaurus:
        out = [_synonym(w, thesaurus, rng) if rng.random() < cfg.synonym_replacement else w for w in out]
    if cfg.char_noise:
        out = [_typo(w, rng) if rng.random() < cfg.char_noise else w for w in out]
    if cfg.word_swap:
        i = 0
        while i < len(out) - 1:
            if rng.random() < cfg.word_swap:
                out[i], out[i + 1] = out[i + 1], out[i]
                i += 2  # a swapped word is not swapped again, so swaps stay local
            else:
                i += 1
    return out


def augment(text: str, cfg: Augmentation, thesaurus: Thesaurus, copy: int) -> str:
    """Copy number ``copy`` of ``text`` with noise; line structure is kept."""
    rng = _rng(cfg.seed, text, copy)
    return "\n".join(" ".join(augment_line(line.split(), cfg, thesaurus, rng)) for line in text.split("\n"))
