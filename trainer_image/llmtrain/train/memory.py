"""What one rank holds of the model and its optimizer: the figures a parallel mesh should shrink.

Measured on the tensors themselves rather than from the mesh's formula, so a layer left unsharded or
an optimizer state kept whole shows up. Optimizer bytes are the torch optimizer's state (Adam's two
moments) plus the parameters it updates when they are not the model's own tensors: ZeRO's flat fp32
partitions, a mixed-precision run's fp32 master copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameter data this rank holds (under ZeRO-3 its partitions, not the whole model)."""
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        local = getattr(p, "ds_tensor", None)
        held = local if local is not None else p.data
        total += held.numel() * held.element_size()
    return total


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, FP16/BF16 optimizers), each of which
    keeps the one it wraps as ``.optimizer``."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and seen < 8:
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def optimizer_state_bytes(engine: Any, model: nn.Module) -> int | None:
    """Bytes of optimizer state on this rank after a step; None when no torch optimizer is found."""
    optimizer = _torch_optimizer(getattr(engine, "optimizer", None))
    if optimizer is None:
        return None
    model_tensors = {p.data_ptr() for p in model.parameters() if p.numel()}
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1 and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += _bytes(value)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.numel() and p.data_ptr() not in model_tensors and p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += _bytes(p)
    return total
