"""A random-init model for serving mechanics that need generation to take a while (no download: it
reuses the trained model's tokenizer). Behaviour tests use the session's ``trained_model`` instead."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


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
