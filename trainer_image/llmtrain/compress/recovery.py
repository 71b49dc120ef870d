"""Recovery fine-tuning after pruning: a few plain-PyTorch AdamW steps on the train split.

Plain torch rather than DeepSpeed: it runs in the single compression process on a model that fits it,
and it has to hold the pruning masks, which is one multiply after each optimiser step here. The
learning rate is a tenth of the job's peak (a short fine-tune of a trained model, not training), with a
linear warm-up over the first tenth of the steps; batches are the job's global batch of training
windows, clipped like training.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmtrain.logs import Logger
from llmtrain.train.data import Position, TokenStream, TrainLoader, Windows, read_manifest, split_files
from llmtrain.train.engine import param_groups

RECOVERY_LR_FRACTION = 0.1


def train_loader(cfg: TrainerConfig, seq_len: int) -> TrainLoader:
    """Training windows for one process, in the job's seeded order from the start of epoch 0."""
    tr = cfg.spec.training
    manifest = read_manifest(cfg.paths.data_dir)
    windows = Windows(
        TokenStream(split_files(cfg.paths.data_dir, manifest, "train"), manifest.dtype), seq_len, tr.seed
    )
    return TrainLoader(windows, tr.micro_batch_size, 0, 1, Position())


def recover(
    model: Any, cfg: TrainerConfig, steps: int, masks: dict[str, Tensor], log: Logger, seq_len: int
) -> float:
    """Fine-tune ``model`` in place for ``steps`` steps; masked weights stay exactly zero. Returns last loss."""
    tr = cfg.spec.training
    torch.manual_seed(tr.seed)
    accumulation = max(1, tr.global_batch_size // tr.micro_batch_size)
    peak = tr.optimizer.learning_rate * RECOVERY_LR_FRACTION
    warmup = max(1, steps // 10)
    optimizer = torch.optim.AdamW(param_groups(model, tr.optimizer.weight_decay), lr=peak)
    device = next(model.parameters()).device  # batches and masks follow the model (run.py places it)
    masked = {name: (model.get_submodule(name).weight, mask.to(device)) for name, mask in masks.items()}
    loader = train_loader(cfg, seq_len)
    model.train()
    loss_value = float("nan")
    started = time.perf_counter()
    every = max(1, steps // 10)
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = peak * min(1.0, (step + 1) / warmup)
            total = 0.0
            for _ in range(accumulation):
                x, y = (t.to(device) for t in loader.next())
                logits = model(input_ids=x).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
                (loss / accumulation).backward()  # type: ignore[no-untyped-call]
                total += float(loss.detach())
            if tr.gradient_clipping:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tr.gradient_clipping)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for weight, mask in masked.values():
                    weight.mul_(mask)
            loss_value = total / accumulation
            if (step + 1) % every == 0 or step + 1 == steps:
                log.event(
                    "recovery",
                    step=step + 1,
                    total_steps=steps,
                    loss=round(loss_value, 5),
                    seconds=round(time.perf_counter() - started, 2),
                )
    finally:
        loader.close()
    model.eval()
    return loss_value
