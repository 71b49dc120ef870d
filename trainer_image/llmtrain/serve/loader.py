"""A model directory -> what the server needs: the model, its tokenizer and their limits.

Loading itself is llmtrain.compress.load's, so every directory the operator produces serves the same
way: the trained export and each compression stage's output (quantised, pruned, distilled).
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


def load(model_dir: str | Path) -> LoadedModel:
    from llmtrain.compress.load import load_model, load_tokenizer

    start = time.monotonic()
    model = load_model(model_dir)
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
        context_length=int(config.max_position_embeddings),
        eos_ids=frozenset(eos),
        pad_id=int(pad),
        parameters=sum(p.numel() for p in model.parameters()),
        seconds=time.monotonic() - start,
    )
