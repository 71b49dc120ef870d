"""The config hash that makes a re-run with unchanged input and configuration a no-op."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmtrain.prepare.readers import ResolvedSource

# Bump when a change to the stage alters its output for the same input, so old shards are rebuilt.
PIPELINE_VERSION = 1


def _file(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def config_hash(
    config: TrainerConfig, sources: list[ResolvedSource], tokenizer: dict[str, Any] | None = None
) -> str:
    """sha256 over the data spec, the vocabulary size, fingerprints of every input file and, with a
    pretrained model, ``tokenizer``: the identity of its tokenizer (source and file contents).

    numWorkers and prepare are left out: they change how, not what, the stage produces.
    """
    data = config.spec.data
    payload = {
        "pipeline_version": PIPELINE_VERSION,
        "data": data.model_dump(mode="json", exclude={"num_workers", "prepare"}),
        "vocab_size": config.spec.model.scratch().vocab_size,
        "context_length": config.spec.model.scratch().context_length,
        "inputs": [s.fingerprint() for s in sources],
        "tokenizer_file": _file(data.tokenizer.path),
        "thesaurus_file": _file(data.augmentation.thesaurus_path if data.augmentation.enabled else None),
    }
    if tokenizer is not None:  # only then, so hashes of from-scratch jobs stay what they were
        payload["pretrained_tokenizer"] = tokenizer
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


_TOKENIZER_FILES = ("vocab.json", "merges.txt")
_TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "added_tokens", "chat_template")


def tokenizer_identity(config: TrainerConfig) -> dict[str, Any] | None:
    """With model.pretrained, what decides the tokens: the source named and its tokenizer files'
    contents (hashed, not stat'ed: a hub cache links the same content under a fresh mtime)."""
    source = config.spec.model.pretrained
    if source is None:
        return None
    from llmtrain import sources

    path = sources.resolve_tokenizer(config)
    files = {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.iterdir())
        if f.is_file() and (f.name in _TOKENIZER_FILES or f.name.startswith(_TOKENIZER_PREFIXES))
    }
    return {"uri": source.uri, "revision": source.revision, "tokenizer": source.tokenizer, "files": files}
