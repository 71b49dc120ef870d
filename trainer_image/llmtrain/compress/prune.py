"""Post-training pruning of a causal LM: magnitude for any family, structured for the families in
``stages.STRUCTURED_FAMILIES`` (Llama, Mistral, Qwen2, Gemma: separate q/k/v/o and gate/up/down).

Magnitude: every decoder linear layer loses its ``sparsity`` fraction of smallest-magnitude weights
(per layer, as the trainer's gradual pruning does: one global threshold would strip the residual
projections first, because they are initialised sqrt(2L) times smaller). The masks are returned so a
recovery fine-tune can keep the zeros.

Structured: whole attention heads (whole key/value groups under grouped-query attention) and MLP
channels are removed, the same number in every layer so the result is again a plain config of the
same family with fewer heads and a smaller intermediate size. Units are ranked by the size of their contribution to the
residual stream on a few training batches: for an MLP channel mean|silu(gate)·up| x ||down column||,
for a head mean ||o_proj(head output)||.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from llmtrain.compress.quantize import decoder_linears
from llmtrain.compress.stages import ModelShape, head_units, kept


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float) -> dict[str, Tensor]:
    """Zero the smallest weights of each decoder linear layer in place; returns {layer: bool keep-mask}."""
    masks: dict[str, Tensor] = {}
    for name in decoder_linears(model):
        weight = model.get_submodule(name).weight
        assert isinstance(weight, Tensor)
        k = round(sparsity * weight.numel())
        keep = torch.ones(weight.numel(), dtype=torch.bool)
        if k:
            keep[torch.topk(weight.detach().abs().flatten().float(), k, largest=False).indices] = False
        masks[name] = keep.view_as(weight)
        weight.mul_(masks[name])
    return masks


@dataclass
class Importance:
    """Per layer: score of each head unit and of each MLP channel (higher = keep)."""

    heads: list[Tensor]
    channels: list[Tensor]


@torch.no_grad()
def importance(model: Any, shape: ModelShape, batches: list[Tensor]) -> Importance:
    """Contribution of each head unit and MLP channel to the residual stream, on ``batches``."""
    layers = model.model.layers
    units, per_unit = head_units(shape)
    d = shape.head_dim
    heads = [torch.zeros(shape.num_heads) for _ in layers]
    channels = [torch.zeros(shape.intermediate_size) for _ in layers]
    hooks = []

    def on_o_proj(i: int) -> Any:
        def hook(module: nn.Linear, args: tuple[Tensor, ...]) -> None:
            x = args[0].float().reshape(-1, shape.num_heads, d)
            w = module.weight.float().reshape(-1, shape.num_heads, d)  # [hidden, heads, d]
            # ||W_h x_h|| for every token and head: the head's write into the residual stream.
            heads[i] += torch.einsum("thd,ohd->tho", x, w).norm(dim=-1).mean(dim=0)

        return hook

    def on_down_proj(i: int) -> Any:
        def hook(module: nn.Linear, args: tuple[Tensor, ...]) -> None:
            act = args[0].float().reshape(-1, shape.intermediate_size)
            channels[i] += act.abs().mean(dim=0) * module.weight.float().norm(dim=0)

        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)))
    try:
        for x in batches:
            model(input_ids=x)
    finally:
        for h in hooks:
            h.remove()
    unit_scores = [h.reshape(units, per_unit).sum(dim=1) for h in heads]
    return Importance(unit_scores, channels)


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores, in their original order (keeps the layout of the rest)."""
    return torch.topk(scores, k).indices.sort().values


@dataclass(frozen=True)
class PrunedShape:
    num_heads: int
    num_key_value_heads: int
    intermediate_size: int


def pruned_shape(shape: ModelShape, sparsity: float) -> PrunedShape:
    units, per_unit = head_units(shape)
    keep_units = kept(units, sparsity)
    gqa = per_unit > 1
    return PrunedShape(
        num_heads=keep_units * per_unit,
        # GQA units carry their key/value head; MHA heads carry theirs; a single shared kv head stays.
        num_key_value_heads=keep_units if (gqa or shape.num_key_value_heads == shape.num_heads) else 1,
        intermediate_size=kept(shape.intermediate_size, sparsity),
    )


@torch.no_grad()
def structured_prune(model: Any, shape: ModelShape, sparsity: float, batches: list[Tensor]) -> Any:
    """A new, smaller model of the same class with the least important heads and channels removed."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    scores = importance(model, shape, batches)
    new = pruned_shape(shape, sparsity)
    units, per_unit = head_units(shape)
    d = shape.head_dim
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, layer_scores in enumerate(scores.heads):
        keep_units = _top(layer_scores, kept(units, sparsity))
        q_heads = (keep_units[:, None] * per_unit + torch.arange(per_unit)).flatten()
        if new.num_key_value_heads == shape.num_key_value_heads:
            kv_heads = torch.arange(shape.num_key_value_heads)
        elif per_unit > 1:
            kv_heads = keep_units
        else:
            kv_heads = q_heads if shape.num_key_value_heads == shape.num_heads else torch.arange(1)
        q_rows = (q_heads[:, None] * d + torch.arange(d)).flatten()
        kv_rows = (kv_heads[:, None] * d + torch.arange(d)).flatten()
        p = f"model.layers.{i}."
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            for kind in ("weight", "bias"):  # Qwen2's q/k/v carry a bias: it loses the same rows
                key = p + f"self_attn.{proj}.{kind}"
                if key in state:
                    state[key] = state[key][rows].contiguous()
        state[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, q_rows].contiguous()
        channels = _top(scores.channels[i], new.intermediate_size)
        for proj in ("gate_proj", "up_proj"):
            state[p + f"mlp.{proj}.weight"] = state[p + f"mlp.{proj}.weight"][channels].contiguous()
        state[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, channels].contiguous()
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_attention_heads = new.num_heads
    config.num_key_value_heads = new.num_key_value_heads
    config.intermediate_size = new.intermediate_size
    config.head_dim = d  # no longer hidden_size / num_heads
    with no_init_weights():
        pruned = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    if config.tie_word_embeddings:
        pruned.tie_weights()  # not done under no_init_weights; untied, recovery would train two copies
    pruned = pruned.to(next(model.parameters()).dtype)
    pruned.load_state_dict(state, strict=True)
    pruned.eval()
    return pruned
