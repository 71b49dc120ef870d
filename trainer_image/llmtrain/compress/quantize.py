"""Swap a causal LM's linear layers and embedding for quantised modules, and back from disk.

Any Hugging Face family: the embedding and head are found through get_input_embeddings /
get_output_embeddings, the linear layers are every nn.Linear (and GPT-2's Conv1D, whose [in, out]
weight is transposed first) but the head; biases (Qwen2's q/k/v, GPT-2's) stay in float.
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

# On-disk format name of each module kind, recorded per module in compression.json.
INT8 = "int8"
INT8_DYNAMIC = "int8-dynamic"
INT4 = "int4"
INT8_EMBEDDING = "int8-embedding"

LINEAR_FORMAT = {"Int8WeightOnly": INT8, "Int8Dynamic": INT8_DYNAMIC, "Int4WeightOnly": INT4}


def _name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return str(name)
    return None


def embedding_name(model: nn.Module) -> str:
    """The token embedding's module name (``model.embed_tokens``, GPT-2's ``transformer.wte``, ...)."""
    get = getattr(model, "get_input_embeddings", None)
    name = _name_of(model, get() if get else None)
    if name is None:
        raise ValueError(f"{type(model).__name__}: no input embedding module")
    return name


def head_name(model: nn.Module) -> str:
    """The output head's module name (``lm_head`` in every family transformers ships)."""
    get = getattr(model, "get_output_embeddings", None)
    name = _name_of(model, get() if get else None)
    return name if name is not None else "lm_head"


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the head shares the embedding's matrix (as the loaded model really does, not the flag)."""
    head = model.get_submodule(head_name(model))
    emb = model.get_submodule(embedding_name(model))
    return getattr(head, "weight", None) is getattr(emb, "weight", 0)


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2's projections: transformers' Conv1D is a linear layer with its weight stored [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_weight(module: nn.Module) -> Tensor:
    """The weight as [out, in], whatever the module stores."""
    weight = module.weight
    assert isinstance(weight, Tensor)
    return weight.t() if _is_conv1d(module) else weight


def decoder_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the decoder blocks (everything but the head), any family."""
    head = head_name(model)
    return [n for n, m in model.named_modules() if is_linear(m) and n != head]


def _weight(model: nn.Module, name: str) -> Tensor:
    weight = model.get_submodule(name).weight
    assert isinstance(weight, Tensor), f"{name} has no weight tensor"
    return weight


def quantize_model(model: nn.Module, method: str, group_size: int, tied: bool) -> dict[str, str]:
    """Replace modules in place; returns {module name: format} for compression.json."""
    linear_format = LINEAR_FORMAT[method]
    formats: dict[str, str] = {}
    for name in decoder_linears(model):
        module = model.get_submodule(name)
        weight, bias = linear_weight(module), module.bias
        assert bias is None or isinstance(bias, Tensor)
        new: nn.Module
        if linear_format == INT4:
            new = Int4WeightOnlyLinear.from_float(weight, group_size, bias)
        elif linear_format == INT8_DYNAMIC:
            new = Int8DynamicLinear.from_float(weight, bias)
        else:
            new = Int8WeightOnlyLinear.from_float(weight, bias)
        model.set_submodule(name, new)
        formats[name] = linear_format
    emb_name, head = embedding_name(model), head_name(model)
    embedding = Int8Embedding.from_float(_weight(model, emb_name))
    model.set_submodule(emb_name, embedding)
    formats[emb_name] = INT8_EMBEDDING
    head_format = INT8_DYNAMIC if linear_format == INT8_DYNAMIC else INT8
    head_cls = Int8DynamicLinear if head_format == INT8_DYNAMIC else Int8WeightOnlyLinear
    if tied:
        model.set_submodule(head, head_cls(embedding.qweight, embedding.scale))
    else:
        head_module = model.get_submodule(head)
        head_bias = head_module.bias if isinstance(head_module.bias, Tensor) else None
        model.set_submodule(head, head_cls.from_float(_weight(model, head), head_bias))
    formats[head] = head_format
    return formats


def tensors_to_save(model: nn.Module, tied: bool) -> dict[str, Tensor]:
    """The state dict as safetensors wants it: contiguous, no tensor stored twice (tied head left out)."""
    state = model.state_dict()
    head = head_name(model) + "."
    return {k: v.contiguous() for k, v in state.items() if not (tied and k.startswith(head))}


def _module(fmt: str, prefix: str, tensors: Mapping[str, Tensor], dtype: torch.dtype) -> nn.Module:
    t = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
    bias = t.get("bias")
    if fmt == INT8:
        return Int8WeightOnlyLinear(t["qweight"], t["scale"], bias)
    if fmt == INT8_DYNAMIC:
        return Int8DynamicLinear(t["qweight"], t["scale"], bias)
    if fmt == INT4:
        return Int4WeightOnlyLinear(t["qweight"], t["scale"], t["zero"], bias)
    if fmt == INT8_EMBEDDING:
        return Int8Embedding(t["qweight"], t["scale"], dtype=dtype)
    raise ValueError(f"unknown quantised module format {fmt!r} for {prefix}")


def install_quantized(
    model: nn.Module, formats: Mapping[str, str], tensors: dict[str, Tensor], tied: bool, dtype: torch.dtype
) -> None:
    """Build the quantised modules named in ``formats`` from ``tensors`` and load everything else."""
    emb_name, head_name_ = embedding_name(model), head_name(model)  # before the swap below
    if tied:
        for key in [k for k in tensors if k.startswith(emb_name + ".")]:
            tensors[head_name_ + key.removeprefix(emb_name)] = tensors[key]
    for name, fmt in formats.items():
        model.set_submodule(name, _module(fmt, name, tensors, dtype))
    if tied:  # share, as at quantisation time, rather than hold two copies
        embedding: Any = model.get_submodule(emb_name)
        head: Any = model.get_submodule(head_name_)
        head.qweight, head.scale = embedding.qweight, embedding.scale
    model.load_state_dict(tensors, strict=True)
