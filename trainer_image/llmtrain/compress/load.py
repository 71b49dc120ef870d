"""Load any model directory the operator produces: the trained export or a compressed stage's output.

    from llmtrain.compress.load import load_model, load_tokenizer
    model = load_model("work/output/compressed/quantize-0")     # CPU, eval mode
    tok = load_tokenizer("work/output/compressed/quantize-0")
    out = model.generate(**tok("The licence", return_tensors="pt"), max_new_tokens=20, do_sample=False)

A directory without ``compression.json`` (the trained export, from scratch or fine-tuned from any
Hugging Face causal LM) and the ``hf`` layout (pruned, distilled) are plain Hugging Face directories
that ``AutoModelForCausalLM`` loads; the ``quantized`` layout is the same architecture rebuilt from
its config with the marker's per-module formats. Either way the result is a transformers causal LM
of the checkpoint's own class, so ``generate`` and its caches behave as for any Hugging Face model.

``device`` (``auto``, ``cpu`` or ``cuda``, see llmtrain.compress.device) moves it after loading,
keeping the checkpoint's dtype: a bf16 checkpoint runs in bf16 on either device and an fp32 one in
fp32, so a model's outputs do not change with the device beyond kernel rounding. The quantized layout
stays on the CPU (``auto``) or is refused (``cuda``): its kernels are PyTorch's CPU ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmtrain.compress.device import resolve_device
from llmtrain.compress.layout import LAYOUT_HF, LAYOUT_QUANTIZED, WEIGHTS, read_marker
from llmtrain.compress.quantize import head_name, install_quantized

QUANTIZED_CPU_ONLY = "the quantized layout runs on PyTorch's CPU int8/int4 kernels"


def layout_of(path: str | Path) -> str:
    marker = read_marker(Path(path))
    return LAYOUT_HF if marker is None else str(marker.get("layout"))


def model_device_for(path: str | Path, device: str) -> torch.device:
    """Where ``load_model(path, device)`` puts the model (raises DeviceError if it cannot)."""
    return resolve_device(device, QUANTIZED_CPU_ONLY if layout_of(path) == LAYOUT_QUANTIZED else None)


def load_model(path: str | Path, device: str = "cpu") -> nn.Module:
    """The model in ``path`` on ``device`` (default the CPU), in eval mode, ready for ``generate``."""
    from transformers import AutoModelForCausalLM

    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root}: not a model directory (no config.json)")
    marker = read_marker(root)
    layout = LAYOUT_HF if marker is None else marker.get("layout")
    target = model_device_for(root, device)  # before the weights are read: a refusal costs nothing
    model: Any
    if layout == LAYOUT_HF:
        model = AutoModelForCausalLM.from_pretrained(root, local_files_only=True)
    elif layout == LAYOUT_QUANTIZED:
        assert marker is not None
        model = _load_quantized(root, marker)
    else:
        raise ValueError(f"{root}: unknown compressed layout {layout!r}")
    model.eval()
    if target.type != "cpu":
        model = model.to(target)
    loaded: nn.Module = model
    return loaded


def _load_quantized(root: Path, marker: dict[str, Any]) -> Any:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(root, local_files_only=True)
    dtype = (
        config.dtype
        if isinstance(config.dtype, torch.dtype)
        else getattr(torch, str(config.dtype or "float32"))
    )
    with no_init_weights():  # every tensor is loaded below; random init would only cost time
        model: Any = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model = model.to(dtype)
    tensors = load_file(str(root / WEIGHTS))
    # Saved tied iff the head's tensors were left out (the fresh model may not be tied yet).
    head = head_name(model) + "."
    install_quantized(model, marker["modules"], tensors, not any(k.startswith(head) for k in tensors), dtype)
    return model


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved beside the model (every layout carries the trained model's tokenizer files)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path), local_files_only=True)
