"""Small real-text shard sets in the ``llmop-shards-v1`` format, for tests and benchmarks.

Writes exactly what ``llmtrain prepare`` writes (manifest.json, tokenizer.json, tokenizer_meta.json,
uint16 shards of eos-terminated documents), from text that is already on the machine, so training can
be exercised without the data stage and without any download.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from llmop_contract.protocol import MANIFEST_FILE, DataManifest, Shard

DEBUG_CONFIG = Path(__file__).parent / "configs" / "debug.yaml"

EOS, PAD = "<|endoftext|>", "<|pad|>"
LICENSES = Path("/usr/share/common-licenses")


def license_documents(min_chars: int = 200) -> list[str]:
    """Paragraph groups of the system's licence texts: real English prose, ~250 KB."""
    docs: list[str] = []
    for path in sorted(p for p in LICENSES.iterdir() if p.is_file()):
        text = path.read_text(errors="replace")
        chunk: list[str] = []
        for para in text.split("\n\n"):
            chunk.append(para.strip())
            if sum(len(c) for c in chunk) >= min_chars:
                docs.append("\n\n".join(chunk))
                chunk = []
    return docs


def write_shards(
    data_dir: str | Path,
    documents: Iterable[str],
    vocab_size: int = 512,
    val_every: int = 10,
    tokens_per_shard: int = 32768,
) -> Path:
    """Train a byte-level BPE on ``documents`` and write train/val shards; every val_every-th doc is val."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    docs = list(documents)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    tok.save(str(root / "tokenizer.json"))
    eos_id, pad_id = tok.token_to_id(EOS), tok.token_to_id(PAD)
    assert eos_id is not None and pad_id is not None
    (root / "tokenizer_meta.json").write_text(
        json.dumps({"eos_token": EOS, "pad_token": PAD, "eos_id": eos_id, "pad_id": pad_id})
    )
    splits: dict[str, list[Shard]] = {}
    for split, chosen in (
        ("train", [d for i, d in enumerate(docs) if i % val_every]),
        ("val", [d for i, d in enumerate(docs) if not i % val_every]),
    ):
        ids: list[int] = []
        for enc in tok.encode_batch(chosen):
            ids.extend(enc.ids)
            ids.append(eos_id)
        tokens = np.asarray(ids, dtype=np.uint16)
        splits[split] = []
        for n, start in enumerate(range(0, len(tokens), tokens_per_shard)):
            name = f"{split}-{n:05d}.bin"
            part = tokens[start : start + tokens_per_shard]
            (root / name).write_bytes(part.tobytes())
            splits[split].append(
                Shard(file=name, tokens=len(part), sha256=hashlib.sha256(part.tobytes()).hexdigest())
            )
    manifest = DataManifest(
        dtype="uint16",
        vocab_size=tok.get_vocab_size(),
        eos_id=eos_id,
        pad_id=pad_id,
        splits=splits,
        stats={"documents": len(docs)},
    )
    (root / MANIFEST_FILE).write_text(manifest.dump())
    return root


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def debug_config(work: str | Path, data_dir: str | Path, spec: dict[str, Any] | None = None) -> Path:
    """configs/debug.yaml with its paths under ``work`` and ``spec`` (camelCase) merged in; returns the file."""
    root = Path(work)
    root.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load(DEBUG_CONFIG.read_text())
    raw["paths"] = {
        "dataDir": str(data_dir),
        "checkpointDir": str(root / "checkpoints"),
        "outputDir": str(root / "output"),
    }
    raw["spec"] = _merge(raw["spec"], spec or {})
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
