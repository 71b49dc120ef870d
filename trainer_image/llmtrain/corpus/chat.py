"""A small chat-format dataset made from the bundled English corpus, for examples and tests.

Each record is one conversation in the OpenAI/Hugging Face messages layout: a system prompt, a user
turn asking for the last word of a sentence from the corpus, and the assistant's one-word answer.
Nothing is downloaded; the same seed gives the same records.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from llmtrain.corpus import _english

SYSTEM = "You answer with one word."
_SENTENCE = re.compile(r"[A-Z][^.!?\n]{20,160}[.!?]")


def sentences() -> list[str]:
    """Plain sentences of the corpus (one per match, duplicates removed, corpus order)."""
    found: dict[str, None] = {}
    for doc in _english():
        for match in _SENTENCE.finditer(doc["text"]):
            found.setdefault(" ".join(match.group(0).split()))
    return list(found)


def last_word(sentence: str) -> str:
    return re.sub(r"\W+$", "", sentence.split()[-1])


def records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` conversations: which word ends the sentence?"""
    pool = [s for s in sentences() if last_word(s).isalpha()]
    rng = random.Random(seed)
    out = []
    for sentence in rng.sample(pool, min(n, len(pool))):
        out.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Last word of: {sentence}"},
                    {"role": "assistant", "content": last_word(sentence)},
                ]
            }
        )
    return out


def write_jsonl(path: str | Path, n: int, seed: int = 0) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for record in records(n, seed):
            fh.write(json.dumps(record) + "\n")
    return out
