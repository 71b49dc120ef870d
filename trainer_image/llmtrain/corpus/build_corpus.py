"""Builds the bundled English corpus (``english.jsonl.gz``) from text that ships with Python and Debian.

Run it from the repository root (it rewrites the committed file; the output is deterministic for a
given Python and Debian install)::

    python -m llmtrain.corpus.build_corpus

Sources, all real English prose under permissive or copyleft licences that allow redistribution:

* ``pydoc_data.topics``: the Python Language Reference topics that ``help()`` shows (PSF licence);
* docstrings of the Python standard library modules, classes and functions (PSF licence);
* the licence texts in ``/usr/share/common-licenses`` (one of each family, to avoid near-identical
  versions such as GPL-2 vs LGPL-2).

Paragraphs are unwrapped (hard-wrapped prose becomes one line; indented code keeps its lines) and
consecutive paragraphs of the same source are grouped into documents of 40 to 160 words. Natural
near-duplicates (exact shingle Jaccard >= 0.5 to an earlier document) are dropped, so the only
duplicates in ``builtin://english-dups`` are the planted ones and its labels are the whole truth.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from llmtrain.prepare.shingles import shingle_strings

OUT = Path(__file__).with_name("english.jsonl.gz")
LICENSES = ("GPL-3", "LGPL-2.1", "GFDL-1.3", "Apache-2.0", "MPL-2.0", "Artistic", "CC0-1.0", "BSD")
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "lib2to3",
    "__pycache__",
    "turtledemo",
    "ensurepip",
}
MIN_WORDS, MAX_WORDS = 40, 160
NATURAL_DUP_JACCARD = 0.5


def _unwrap(paragraph: str) -> str:
    lines = paragraph.strip("\n").splitlines()
    if any(line.startswith((" ", "\t")) for line in lines[1:]) or paragraph.startswith((" ", "\t")):
        return "\n".join(line.rstrip() for line in lines)
    return " ".join(line.strip() for line in lines)


def _paragraphs(text: str) -> list[str]:
    return [_unwrap(p) for p in re.split(r"\n\s*\n", text) if p.strip()]


def _topics() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]


def _docstrings() -> Iterator[tuple[str, str]]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for fname in sorted(files):
            if not fname.endswith(".py"):
                continue
            path = Path(root, fname)
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    doc = ast.get_docstring(node)
                    if doc:
                        yield f"stdlib:{path.relative_to(lib)}", doc


def _licenses() -> Iterator[tuple[str, str]]:
    for name in LICENSES:
        path = Path("/usr/share/common-licenses", name)
        if path.exists():
            yield f"license:{name}", path.read_text(encoding="utf-8", errors="replace")


def _documents() -> Iterator[dict[str, str]]:
    # Paragraphs of consecutive items from the same source (e.g. all docstrings of one module) are
    # grouped, so short docstrings still form documents of a useful length.
    group: list[str] = []
    count = 0
    current = ""
    for gen in (_topics, _docstrings, _licenses):
        for source, text in gen():
            for para in _paragraphs(text):
                n = len(para.split())
                if group and (source != current or count + n > MAX_WORDS):
                    if count >= MIN_WORDS:
                        yield {"source": current, "text": "\n\n".join(group)}
                    group, count = [], 0
                current = source
                group.append(para)
                count += n
    if count >= MIN_WORDS:
        yield {"source": current, "text": "\n\n".join(group)}


def drop_natural_duplicates(docs: list[dict[str, str]], shingle_size: int = 5) -> list[dict[str, str]]:
    """Keeps a document only if its exact shingle Jaccard to every kept document is below the cut."""
    index: dict[str, list[int]] = {}
    kept_sets: list[set[str]] = []
    out: list[dict[str, str]] = []
    for doc in docs:
        sh = set(shingle_strings(doc["text"], shingle_size))
        shared: dict[int, int] = {}
        for s in sh:
            for k in index.get(s, ()):
                shared[k] = shared.get(k, 0) + 1
        if any(c / (len(sh) + len(kept_sets[k]) - c) >= NATURAL_DUP_JACCARD for k, c in shared.items()):
            continue
        for s in sh:
            index.setdefault(s, []).append(len(kept_sets))
        kept_sets.append(sh)
        out.append(doc)
    return out


def build() -> list[dict[str, str]]:
    docs = drop_natural_duplicates(list(_documents()))
    for i, doc in enumerate(docs):
        doc["id"] = f"en-{i:05d}"
    return docs


def main() -> None:
    docs = build()
    # mtime=0 keeps the gzip bytes reproducible.
    with open(OUT, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        for doc in docs:
            gz.write(
                (json.dumps({"id": doc["id"], "source": doc["source"], "text": doc["text"]}) + "\n").encode()
            )
    chars = sum(len(d["text"]) for d in docs)
    print(f"wrote {OUT}: {len(docs)} documents, {chars} characters, {OUT.stat().st_size} bytes compressed")


if __name__ == "__main__":
    main()
