"""A labelled classification set made from the bundled corpus, for fine-tuning tests and experiments.

Task: name the kind of text a passage comes from. ``builtin://english`` holds three kinds, told
apart by each record's ``source``: software licences (``license:*``), the Python language reference
(``pydoc:*``) and standard-library docstrings (``stdlib:*``). Each document is cut into passages of
``words`` words; a record is ``{"text": passage, "label": one of LABELS}``, classes balanced by
sampling, and train and test passages come from disjoint documents (no passage of a test document
is ever trained on). A model that was never fine-tuned does not answer in this format at all; a
tiny one learns it, and most of the labels, in a few hundred CPU steps, since the kinds differ in
vocabulary ("Licensee", "statement", "Return the").

The prompt and answer are fixed (``PROMPT_TEMPLATE``, the answer is ``" " + label``), as in
``data_format()``, the spec.data.format of a Template job over these records.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmtrain import corpus

LABELS = {"license": "license", "pydoc": "reference", "stdlib": "library"}
"""Corpus source prefix -> the label the model is to answer."""
PROMPT_TEMPLATE = "Passage: {text}\nSource:"


def data_format() -> dict[str, Any]:
    """spec.data.format (camelCase) for these records: the answer is ' <label>' after the prompt."""
    return {"type": "Template", "promptTemplate": PROMPT_TEMPLATE, "completionField": "label"}


def _passages(text: str, words: int) -> list[str]:
    tokens = text.split()
    return [" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words + 1, words)]


def classification_records(
    words: int = 32, per_class: int = 300, test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test) records, each class ``per_class`` passages at most (fewer when a kind has fewer),
    the test share ``test_fraction`` of each class, from documents the train records never use."""
    rng = random.Random(seed)
    by_label: dict[str, list[dict[str, Any]]] = {label: [] for label in LABELS.values()}
    for doc in corpus.load("english"):
        label = LABELS.get(str(doc["source"]).split(":", 1)[0])
        if label is not None:
            by_label[label].append(doc)
    train: list[dict[str, str]] = []
    test: list[dict[str, str]] = []
    for label, docs in sorted(by_label.items()):
        rng.shuffle(docs)
        n_test_docs = max(1, round(len(docs) * test_fraction))
        for part, chosen, share in (
            (test, docs[:n_test_docs], test_fraction),
            (train, docs[n_test_docs:], 1 - test_fraction),
        ):
            passages = [p for d in chosen for p in _passages(str(d["text"]), words)]
            rng.shuffle(passages)
            part += [{"text": p, "label": label} for p in passages[: round(per_class * share)]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_classification(out_dir: str | Path, **kw: Any) -> tuple[Path, Path]:
    """``train.jsonl`` and ``test.jsonl`` under ``out_dir``; keyword arguments as classification_records."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in zip(("train", "test"), classification_records(**kw), strict=True):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        paths.append(path)
    return paths[0], paths[1]


def prompt(record: dict[str, str]) -> str:
    return PROMPT_TEMPLATE.replace("{text}", record["text"])


def accuracy(records: Sequence[dict[str, str]], answer: Callable[[str], str]) -> float:
    """Share of ``records`` whose label is the first word ``answer(prompt)`` returns (greedy text after
    the prompt); an answer in any other format counts as wrong."""
    right = 0
    for r in records:
        words = answer(prompt(r)).split()
        right += bool(words) and words[0].strip(".,:;") == r["label"]
    return right / max(len(records), 1)
