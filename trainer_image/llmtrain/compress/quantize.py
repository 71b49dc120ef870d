"""Swap a LlamaForCausalLM's linear layers and embedding for quantised modules, and back from disk.

Every decoder linear layer gets the method's format. The token embedding and the output head are
always int8 per row, whatever the method: in the small models this operator trains they hold a large
share of the weights (a quarter of the debug model), so leaving them in fp32 would keep an int8 model
above 40% of the fp32 size; int4 is not used for them because the head's rounding error lands
directly on every logit. With tied embeddings the head shares the embedding's int8 tensors (one copy on
disk and in memory), as the fp32 model shares its matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from llmtrain.compress.quantized import (
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8Embedding,
    Int8WeightOnlyLinear,
)

EMBEDDING = "model.embed_tokens"
HEAD = "lm_head"

# On-disk format name of each module kind, recorded per module in compression.json.
INT8 = "int8"
INT8_DYNAMIC = "int8-dynamic"
INT4 = "int4"
INT8_EMBEDDING = "int8-embedding"

LINEAR_FORMAT = {"Int8WeightOnly": INT8, "Int8Dynamic": INT8_DYNAMIC, "Int4WeightOnly": INT4}


def decoder_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the decoder blocks (everything but the head)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != HEAD]


def _weight(model: nn.Module, name: str) -> Tensor:
    weight = model.get_submodule(name).weight
    assert isinstance(weight, Tensor), f"{name} has no weight tensor"
    return weight


def quantize_model(model: nn.Module, method: str, group_size: int, tied: bool) -> dict[str, str]:
    """Replace modules in place; returns {module name: format} for compression.json."""
    linear_format = LINEAR_FORMAT[method]
    formats: dict[str, str] = {}
    for name in decoder_linears(model):
        weight = _weight(model, name)
        new: nn.Module
        if linear_format == INT4:
            new = Int4WeightOnlyLinear.from_float(weight, group_size)
        elif linear_format == INT8_DYNAMIC:
            new = Int8DynamicLinear.from_float(weight)
        else:
            new = Int8WeightOnlyLinear.from_float(weight)
        model.set_submodule(name, new)
        formats[name] = linear_format
    embedding = Int8Embedding.from_float(_weight(model, EMBEDDING))
    model.set_submodule(EMBEDDING, embedding)
    formats[EMBEDDING] = INT8_EMBEDDING
    head_format = INT8_DYNAMIC if linear_format == INT8_DYNAMIC else INT8
    head_cls = Int8DynamicLinear if head_format == INT8_DYNAMIC else Int8WeightOnlyLinear
    if tied:
        model.set_submodule(HEAD, head_cls(embedding.qweight, embedding.scale))
    else:
        model.set_submodule(HEAD, head_cls.from_float(_weight(model, HEAD)))
    formats[HEAD] = head_format
    return formats


def tensors_to_save(model: nn.Module, tied: bool) -> dict[str, Tensor]:
    """The state dict as safetensors wants it: contiguous, no tensor stored twice (tied head left out)."""
    state = model.state_dict()
    return {k: v.contiguous() for k, v in state.items() if not (tied and k.startswith(HEAD + "."))}


def _module(fmt: str, prefix: str, tensors: Mapping[str, Tensor], dtype: torch.dtype) -> nn.Module:
    t = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
    if fmt == INT8:
        return Int8WeightOnlyLinear(t["qweight"], t["scale"])
    if fmt == INT8_DYNAMIC:
        return Int8DynamicLinear(t["qweight"], t["scale"])
    if fmt == INT4:
        return Int4WeightOnlyLinear(t["qweight"], t["scale"], t["zero"])
    if fmt == INT8_EMBEDDING:
        return Int8Embedding(t["qweight"], t["scale"], dtype=dtype)
    raise ValueError(f"unknown quantised module format {fmt!r} for {prefix}")


def install_quantized(
    model: nn.Module, formats: Mapping[str, str], tensors: dict[str, Tensor], tied: bool, dtype: torch.dtype
) -> None:
    """Build the quantised modules named in ``formats`` from ``tensors`` and load everything else."""
    if tied:
        for key in [k for k in tensors if k.startswith(EMBEDDING + ".")]:
            tensors[HEAD + key.removeprefix(EMBEDDING)] = tensors[key]
    for name, fmt in formats.items():
        model.set_submodule(name, _module(fmt, name, tensors, dtype))
    if tied:  # share, as at quantisation time, rather than hold two copies
        embedding: Any = model.get_submodule(EMBEDDING)
        head: Any = model.get_submodule(HEAD)
        head.qweight, head.scale = embedding.qweight, embedding.scale
    model.load_state_dict(tensors, strict=True)
