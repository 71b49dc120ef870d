"""A model directory -> what the server needs: the model, its tokenizer and their limits.

Loading itself is llmtrain.compress.load's, so every directory the operator produces serves the same
way: the trained export and each compression stage's output (quantised, pruned, distilled).

The model goes to the device ``llmtrain.compress.load.resolve_device`` picks (``auto``: CUDA when
present, except for layouts whose kernels are CPU-only) in the checkpoint's own dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    context_length: int
    """Positions the model was trained for: prompt plus completion must fit."""
    eos_ids: frozenset[int]
    pad_id: int
    parameters: int
    seconds: float


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list | tuple) else {int(value)}


# Where architectures keep the positions they were trained for (Llama-likes, GPT-2/GPT-J, others).
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_NO_LIMIT = 10**7  # tokenizers without a limit report a huge sentinel (transformers' VERY_LARGE_INTEGER)


def context_length(config: Any, tokenizer: Any = None) -> int:
    """The model's context length from its config, by the name its architecture uses for it.

    Models without one (ALiBi, e.g. Bloom) fall back to the tokenizer's ``model_max_length`` when it
    states a real limit; otherwise this raises rather than guess a limit the server would enforce.
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for name in CONTEXT_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
        return limit
    raise ValueError(
        f"no context length: the config has none of {', '.join(CONTEXT_FIELDS)} and the tokenizer"
        " states no model_max_length"
    )


def load(model_dir: str | Path, device: str = "cpu") -> LoadedModel:
    from llmtrain.compress.load import load_model, load_tokenizer

    start = time.monotonic()
    model = load_model(model_dir, device=device)
    tokenizer = load_tokenizer(model_dir)
    config: Any = getattr(model, "config", None)
    generation: Any = getattr(model, "generation_config", None)
    eos = _ids(getattr(generation, "eos_token_id", None)) | _ids(getattr(config, "eos_token_id", None))
    eos |= _ids(tokenizer.eos_token_id)
    if not eos:
        raise ValueError(f"{model_dir}: no end-of-text token in the config or the tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        context_length=context_length(config, tokenizer),
        eos_ids=frozenset(eos),
        pad_id=int(pad),
        parameters=sum(p.numel() for p in model.parameters()),
        seconds=time.monotonic() - start,
    )
