"""Dynamic sparsity: gradual magnitude pruning with the cubic schedule of Zhu & Gupta (2017).

At every ``frequency`` steps between startStep and endStep each prunable linear layer keeps its
largest-magnitude weights and masks the rest, reaching targetSparsity at endStep. The masks live in
the model (``Linear.mask``) and multiply the weights on every forward, so they hold after every
optimiser step without touching optimiser state, and they are checkpointed with the module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from llmop_contract.api.v1alpha1.training import Sparsity
from llmtrain.model.llama import Linear, Llama


def target_sparsity(step: int, sp: Sparsity) -> float:
    """s_t = s_f * (1 - (1 - (t - t0) / (t1 - t0))^3), 0 before startStep, s_f after endStep."""
    if step <= sp.start_step:
        return 0.0
    if step >= sp.end_step:
        return sp.target_sparsity
    frac = (step - sp.start_step) / (sp.end_step - sp.start_step)
    return sp.target_sparsity * (1.0 - (1.0 - frac) ** 3)


def due(step: int, sp: Sparsity) -> bool:
    """Whether masks are updated after optimiser step ``step`` (1-based count of finished steps)."""
    if not sp.enabled or step < sp.start_step:
        return False
    return step == sp.end_step or (step <= sp.end_step and (step - sp.start_step) % sp.frequency == 0)


@contextlib.contextmanager
def _materialised(p: torch.Tensor, zero3: bool) -> Iterator[None]:
    if zero3:
        import deepspeed  # only needed when parameters are partitioned

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            yield
    else:
        yield


def prunable(model: Llama) -> list[Linear]:
    return [m for m in model.linears() if m.mask is not None]


@torch.no_grad()
def update_masks(model: Llama, sparsity: float, zero3: bool) -> None:
    """Mask the smallest ``sparsity`` fraction of each prunable layer's effective weights.

    Every rank holds identical weights, so every rank computes the identical mask without
    communication (ZeRO-3 gathers each weight for the duration of its own update).
    """
    for layer in prunable(model):
        mask = layer.mask
        assert mask is not None
        with _materialised(layer.weight, zero3):
            magnitude = (layer.weight.float() * mask).abs().flatten()
            k = round(sparsity * magnitude.numel())
            new = torch.ones_like(magnitude)
            if k > 0:
                # Already-pruned weights have magnitude 0, so pruning only ever grows.
                new[torch.topk(magnitude, k, largest=False, sorted=False).indices] = 0
            mask.copy_(new.view_as(mask))


def measured_sparsity(model: Llama) -> float:
    layers = prunable(model)
    if not layers:
        return 0.0
    masks = [m.mask for m in layers if m.mask is not None]
    return sum(int((mask == 0).sum()) for mask in masks) / sum(mask.numel() for mask in masks)
