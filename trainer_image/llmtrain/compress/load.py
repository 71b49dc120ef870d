"""Load any model directory the operator produces: the trained export or a compressed stage's output.

    from llmtrain.compress.load import load_model, load_tokenizer
    model = load_model("work/output/compressed/quantize-0")     # CPU, eval mode
    tok = load_tokenizer("work/output/compressed/quantize-0")
    out = model.generate(**tok("The licence", return_tensors="pt"), max_new_tokens=20, do_sample=False)

A directory without ``compression.json`` (the trained export) and the ``hf`` layout (pruned,
distilled) are plain LlamaForCausalLM directories; the ``quantized`` layout is rebuilt from its
config with the marker's per-module formats. Either way the result is a transformers
LlamaForCausalLM, so ``generate`` and its caches behave as for any Hugging Face model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmtrain.compress.layout import LAYOUT_HF, LAYOUT_QUANTIZED, WEIGHTS, read_marker
from llmtrain.compress.quantize import install_quantized


def load_model(path: str | Path) -> nn.Module:
    """The model in ``path`` on the CPU, in eval mode, ready for ``generate``."""
    from transformers import LlamaForCausalLM

    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root}: not a model directory (no config.json)")
    marker = read_marker(root)
    layout = LAYOUT_HF if marker is None else marker.get("layout")
    model: Any
    if layout == LAYOUT_HF:
        model = LlamaForCausalLM.from_pretrained(root, local_files_only=True)
    elif layout == LAYOUT_QUANTIZED:
        assert marker is not None
        model = _load_quantized(root, marker)
    else:
        raise ValueError(f"{root}: unknown compressed layout {layout!r}")
    model.eval()
    loaded: nn.Module = model
    return loaded


def _load_quantized(root: Path, marker: dict[str, Any]) -> Any:
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    config = LlamaConfig.from_pretrained(root, local_files_only=True)
    dtype = (
        config.dtype
        if isinstance(config.dtype, torch.dtype)
        else getattr(torch, str(config.dtype or "float32"))
    )
    with no_init_weights():  # every tensor is loaded below; random init would only cost time
        model: Any = LlamaForCausalLM(config)
    model = model.to(dtype)
    tensors = load_file(str(root / WEIGHTS))
    install_quantized(model, marker["modules"], tensors, bool(config.tie_word_embeddings), dtype)
    return model


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved beside the model (every layout carries the trained model's tokenizer files)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path), local_files_only=True)
