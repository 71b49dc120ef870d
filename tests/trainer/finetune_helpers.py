"""Fine-tuning fixtures: tiny Hugging Face checkpoints, shards made with their tokenizer, configs.

Everything is built locally (llmtrain.testing_hf): nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from llmop_contract.protocol import MANIFEST_FILE, DataManifest, Shard
from llmtrain.testing import DEBUG_CONFIG, license_documents
from tests.trainer.ranks import events, torchrun

__all__ = ["events", "finetune_config", "torchrun", "write_hf_shards"]


def write_hf_shards(data_dir: Path, tokenizer_dir: Path, val_every: int = 10) -> Path:
    """Plain-text shards of the licence corpus tokenised with a Hugging Face tokenizer (saved alongside,
    as the data stage does for a pretrained model)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    docs = license_documents()
    splits: dict[str, list[Shard]] = {}
    for split, chosen in (
        ("train", [d for i, d in enumerate(docs) if i % val_every]),
        ("val", [d for i, d in enumerate(docs) if not i % val_every]),
    ):
        ids: list[int] = []
        for row in tok(chosen, add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(tok.eos_token_id)
        tokens = np.asarray(ids, dtype=np.uint16)
        name = f"{split}-00000.bin"
        (data_dir / name).write_bytes(tokens.tobytes())
        splits[split] = [
            Shard(file=name, tokens=len(tokens), sha256=hashlib.sha256(tokens.tobytes()).hexdigest())
        ]
    tok.save_pretrained(data_dir)
    manifest = DataManifest(
        dtype="uint16",
        vocab_size=len(tok),
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        splits=splits,
        stats={"documents": len(docs)},
    )
    (data_dir / MANIFEST_FILE).write_text(manifest.dump())
    return data_dir


def finetune_config(
    work: Path, data_dir: Path, model_dir: Path, training: dict[str, Any], zero: int, world: int = 2
) -> Path:
    """configs/debug.yaml with the model replaced by ``model_dir`` (pretrained) and ``training`` merged."""
    raw = yaml.safe_load(DEBUG_CONFIG.read_text())
    work.mkdir(parents=True, exist_ok=True)
    raw["paths"] = {
        "volumeDir": str(work),
        "dataDir": str(data_dir),
        "checkpointDir": str(work / "checkpoints"),
        "outputDir": str(work / "output"),
    }
    spec = raw["spec"]
    spec["model"] = {"pretrained": {"uri": str(model_dir)}}
    spec["training"].update(training)
    spec["deepspeed"] = {
        "zeroStage": zero,
        "communication": {"reduceBucketSize": 50_000, "allgatherBucketSize": 50_000},
    }
    spec["workers"]["procsPerNode"] = world
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
