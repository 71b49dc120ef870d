"""Small local models for the serving and ONNX tests: one really trained, one random and slower.

Nothing is downloaded: the trained one comes from `llmtrain train` on the system's licence texts,
the random one reuses its tokenizer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from llmtrain.testing import debug_config, license_documents, write_shards

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def train_tiny_model(work: Path, steps: int = 150) -> Path:
    """`llmtrain train` of the debug model (124k parameters, 128 positions); returns the export."""
    data = write_shards(work / "data", license_documents()[:300])
    config = debug_config(work, data, {"model": {"contextLength": 128}, "training": {"maxSteps": steps}})
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "NNODES", "NPROC_PER_NODE")}
    env.update(DS_ACCELERATOR="cpu", LLMOP_METRICS_PORT="0")
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", "train", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work / "output" / "model"


def random_model(
    dest: Path, tokenizer_from: Path, hidden: int = 256, layers: int = 4, positions: int = 2048
) -> Path:
    """A random-init LlamaForCausalLM that never ends a text by itself: for timing-dependent mechanics.

    The end-of-text row of the tied embedding is zero, so its logit is exactly 0 while the largest of
    the other 511 random logits is positive: greedy decoding always runs to max_tokens.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmtrain.compress.load import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_from)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=positions,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.eos_token_id].zero_()
    model.save_pretrained(dest)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / name, dest / name)
    return dest
