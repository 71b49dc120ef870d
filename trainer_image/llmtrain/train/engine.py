"""Optimiser construction and deepspeed.initialize.

The optimiser is always built here and handed to DeepSpeed rather than named in the DeepSpeed config:
DeepSpeed's own Adam variants are C++/CUDA extensions JIT-compiled on first use, which on a CPU-only
machine means minutes of compiling (or failing without a toolchain) for no gain, since torch's
AdamW/Adam/SGD already run there natively. With CPU offload on a GPU node, DeepSpeedCPUAdam is several
times faster than torch's CPU Adam, so it is used there when its extension builds.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.api.v1alpha1.training import Offload, OptimizerType
from llmop_contract.deepspeed import gradient_accumulation_steps, render_deepspeed_config
from llmtrain.logs import Logger
from llmtrain.model.hf import HostMemory, bound_host_heap, host_memory, trim_host_heap
from llmtrain.train import pipeline


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: decaying norm gains towards zero only hurts (nanoGPT/Llama practice)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainerConfig, log: Logger) -> torch.optim.Optimizer:
    o = cfg.spec.training.optimizer
    groups = param_groups(model, o.weight_decay)
    if o.type == OptimizerType.SGD:
        return torch.optim.SGD(groups, lr=o.learning_rate, momentum=o.momentum, nesterov=o.nesterov)
    adamw = o.type == OptimizerType.ADAMW
    betas = (o.beta1, o.beta2)
    if cfg.spec.deepspeed.offload_optimizer == Offload.CPU and torch.cuda.is_available():
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, lr=o.learning_rate, betas=betas, eps=o.epsilon, adamw_mode=adamw)  # type: ignore[no-any-return]
        except Exception as exc:  # no compiler in the image, ABI mismatch, ...
            log.event("optimizer_fallback", reason=f"DeepSpeedCPUAdam unavailable: {exc}")
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    # Adam's weight_decay is the coupled L2-in-gradient form, AdamW's the decoupled one, as the API says.
    # fused: one kernel over every tensor instead of torch's default on CPU, a Python loop of small ops
    # per tensor (hundreds with LoRA); transformers' Trainer uses the same (adamw_torch_fused).
    return cls(groups, lr=o.learning_rate, betas=betas, eps=o.epsilon, fused=True)


def running_world() -> int:
    """The processes training together: the process group's size once it exists, else WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size())
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_config(cfg: TrainerConfig, world: int | None = None) -> dict[str, Any]:
    """The operator-rendered config when the ConfigMap carries one, else rendered here from the spec,
    with its batch fitted to ``world`` processes (default: those running, see ``running_world``)."""
    config = cfg.deepspeed_config if cfg.deepspeed_config is not None else render_deepspeed_config(cfg.spec)
    return fit_world(config, cfg, running_world() if world is None else world)


def fit_world(config: dict[str, Any], cfg: TrainerConfig, world: int) -> dict[str, Any]:
    """``config`` with the gradient accumulation of a ``world``-process run of globalBatchSize.

    Both configs are rendered for numNodes x procsPerNode processes, but an elastic gang also runs at
    other sizes (the operator sets NNODES to the current one and leaves the ConfigMap as written), and
    DeepSpeed refuses a config whose train_batch_size is not micro-batch x accumulation x world. The
    global batch stays globalBatchSize, so a step sees the same samples at every size. A config that
    already fits is returned as it is, overrides and all.
    """
    tr = cfg.spec.training
    accumulation = gradient_accumulation_steps(cfg.spec, world)  # ValueError when world does not divide
    if config.get("gradient_accumulation_steps") == accumulation:
        return config
    return {
        **config,
        "train_batch_size": tr.global_batch_size,
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
    }


def initialize(
    model: nn.Module, cfg: TrainerConfig, log: Logger, config: dict[str, Any] | None = None, mpu: Any = None
) -> Any:
    """DeepSpeed's engine around ``model``; ``config`` is the DeepSpeed config a pretrained model was
    already loaded under (ZeRO-3), so both see the same one. Only parameters that require gradients
    reach the optimiser: with LoRA, the adapters. ``mpu``: the mesh's process groups (``Mesh.groups``)
    under tensor parallel, where DeepSpeed's AutoTP shards the model inside initialize; None for a
    PipelineModule, whose grid is the mpu (with AutoTP, on the topology ``pipeline.adopt_tensor_parallel``
    gives it)."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    ds_config = copy.deepcopy(config if config is not None else deepspeed_config(cfg))
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage == 3:
        bound_host_heap()  # a scratch model too gathers and frees layers every step (see hf)
    before = host_memory()
    tensor = int(ds_config.get("tensor_parallel", {}).get("autotp_size", 1))
    staged_tensor = isinstance(model, PipelineModule) and tensor > 1
    if staged_tensor:
        # Tensor x pipeline: the stages' grid and AutoTP's groups made one topology first (a
        # PipelineModule is its own mpu: deepspeed.initialize takes none with it).
        pipeline.adopt_tensor_parallel(model, tensor)
    optimizer = build_optimizer(model, cfg, log)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    if staged_tensor:
        pipeline.attach_tensor_parallel(engine)
    trim_host_heap()
    log_loading_memory(log, model, stage, before)
    return engine


def log_loading_memory(log: Logger, model: nn.Module, stage: int, before_initialize: HostMemory) -> None:
    """The ``loading_memory`` event: what loading the model and starting DeepSpeed cost this host.

    ``baseline_rss_bytes`` is resident memory with the libraries imported: for a pretrained model
    before from_pretrained, before the model existed; for a scratch one (already built) before
    initialize. Host memory only: on a GPU the weights are device memory (the ``memory`` metric);
    ``load_peak_bytes`` the high-water mark after from_pretrained, ``peak_rss_bytes`` after
    deepspeed.initialize (at ZeRO-1..3 DeepSpeed creates the optimiser state there, torch's optimisers
    only at the first step). Anonymous vs file-backed tells tensors from mapped checkpoint pages.
    """
    baseline: HostMemory = getattr(model, "memory_before_load", None) or before_initialize
    loaded: HostMemory | None = getattr(model, "memory_loaded", None)
    now = host_memory()
    log.event(
        "loading_memory",
        zero_stage=stage,
        baseline_rss_bytes=baseline.rss,
        load_peak_bytes=loaded.peak if loaded is not None else None,
        peak_rss_bytes=now.peak,
        peak_over_baseline_bytes=now.peak - baseline.rss,
        rss_bytes=now.rss,
        anonymous_bytes=now.anonymous,
        file_bytes=now.file,
    )


def set_learning_rate(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
