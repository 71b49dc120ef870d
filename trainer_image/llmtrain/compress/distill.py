"""Knowledge distillation: a smaller student trained on the teacher's logits, with DeepSpeed.

The student is the trainer's own Llama (``build_model``) with the spec's shape and the teacher's
vocabulary, context and embedding tying, trained by a DeepSpeed engine built exactly as in training
(``train.engine.initialize``: the job's optimiser type, betas, weight decay, precision, ZeRO stage and
clipping), in one process (on CPU: gloo, a world of one). Loss per token:

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, next token)

(T^2 keeps the soft-target gradients on the scale of the hard-target ones, Hinton et al. 2015), with
the job's learning-rate schedule at the distillation's peak rate (warm-up capped at a tenth of the
steps). alpha = 0 is plain training from scratch, the control the tests compare against.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from llmop_contract.api.v1alpha1.lifecycle import Distillation
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.api.v1alpha1.workload import WorkersSpec
from llmtrain.adapt import llama_args
from llmtrain.compress.recovery import train_loader
from llmtrain.compress.stages import ModelShape, student_spec
from llmtrain.logs import Logger
from llmtrain.model.llama import build_model
from llmtrain.train import dist
from llmtrain.train.data import read_manifest
from llmtrain.train.engine import initialize, set_learning_rate
from llmtrain.train.export import export_model, full_state_dict
from llmtrain.train.schedule import learning_rate


def distillation_loss(
    student: Tensor, teacher: Tensor | None, targets: Tensor, temperature: float, alpha: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, kd, ce) averaged over tokens; logits [B, T, V], targets [B, T]; no teacher when alpha = 0."""
    s = student.float().reshape(-1, student.size(-1))
    ce = F.cross_entropy(s, targets.reshape(-1))
    if teacher is None or alpha == 0:
        return ce, torch.zeros_like(ce), ce
    t = teacher.float().reshape(-1, teacher.size(-1))
    kd = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    ) * (temperature**2)
    return alpha * kd + (1 - alpha) * ce, kd, ce


def single_process_config(cfg: TrainerConfig, spec: Distillation) -> TrainerConfig:
    """The job's config as one process: same batch (via accumulation), optimiser and DeepSpeed settings."""
    workers: WorkersSpec = cfg.spec.workers.model_copy(update={"num_nodes": 1, "procs_per_node": 1})
    training = cfg.spec.training.model_copy(
        update={
            "optimizer": cfg.spec.training.optimizer.model_copy(update={"learning_rate": spec.learning_rate})
        }
    )
    return cfg.model_copy(
        update={
            "spec": cfg.spec.model_copy(update={"workers": workers, "training": training}),
            "deepspeed_config": None,
        }
    )


def _optimizer_step(
    engine: Any, loader: Any, teacher: Any, spec: Distillation, accumulation: int, device: Any
) -> tuple[torch.Tensor, int]:
    """One optimiser step over ``accumulation`` micro-batches: summed (loss, kd, ce) and tokens seen."""
    sums, tokens = torch.zeros(3), 0
    for _ in range(accumulation):
        x, y = loader.next()
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=x).logits if spec.alpha else None
        logits, _ = engine(x)
        loss, kd, ce = distillation_loss(logits, teacher_logits, y, spec.temperature, spec.alpha)
        engine.backward(loss)
        engine.step()
        sums += torch.stack([loss.detach().float(), kd.detach().float(), ce.detach().float()]).cpu()
        tokens += x.numel()
    return sums, tokens


def distill(
    cfg: TrainerConfig,
    spec: Distillation,
    teacher: Any,
    teacher_shape: ModelShape,
    out_dir: Path,
    log: Logger,
) -> dict[str, float]:
    """Train the student and export it (HF layout) into ``out_dir``; returns training figures."""
    env = dist.setup()
    one = single_process_config(cfg, spec)
    tr = one.spec.training
    student_args = llama_args(student_spec(spec.student, teacher_shape, cfg.spec.model))
    seq_len = min(tr.sequence_length, teacher_shape.context_length)
    torch.manual_seed(tr.seed)
    student = build_model(student_args, seed=tr.seed)
    log.event(
        "distill_start",
        student_parameters=student_args.num_parameters(),
        teacher_parameters=teacher_shape.num_parameters(),
        steps=spec.steps,
        temperature=spec.temperature,
        alpha=spec.alpha,
        learning_rate=spec.learning_rate,
        zero_stage=one.spec.deepspeed.zero_stage,
        precision=tr.precision.value,
    )
    engine = initialize(student, one, log)
    accumulation = engine.gradient_accumulation_steps()
    schedule = tr.lr_schedule.model_copy(
        update={
            "warmup_steps": min(tr.lr_schedule.effective_warmup_steps(spec.steps), max(1, spec.steps // 10))
        }
    )
    loader = train_loader(cfg, seq_len)
    device = engine.device
    # Batches go to the engine's device (a GPU when the pod has one); the teacher was loaded on the CPU,
    # and a CPU teacher fed CUDA batches fails at its first forward pass.
    teacher = teacher.to(device)
    started = time.perf_counter()
    every = max(1, spec.steps // 10)
    figures: dict[str, float] = {}
    try:
        for step in range(spec.steps):
            lr = learning_rate(step, spec.steps, spec.learning_rate, schedule)
            set_learning_rate(engine, lr)
            sums, tokens = _optimizer_step(engine, loader, teacher, spec, accumulation, device)
            if (step + 1) % every == 0 or step + 1 == spec.steps:
                mean = (sums / accumulation).tolist()
                elapsed = time.perf_counter() - started
                figures = {"trainLoss": mean[0], "distillationLoss": mean[1], "nextTokenLoss": mean[2]}
                log.event(
                    "distill",
                    step=step + 1,
                    total_steps=spec.steps,
                    loss=round(mean[0], 5),
                    kd=round(mean[1], 5),
                    ce=round(mean[2], 5),
                    lr=lr,
                    tokens_per_second=round((step + 1) * tokens / elapsed, 1),
                )
    finally:
        loader.close()
    state = full_state_dict(engine, one.spec.deepspeed.zero_stage)
    assert state is not None and env.is_main
    export_model(state, student_args, read_manifest(cfg.paths.data_dir), cfg.paths.data_dir, out_dir)
    figures["steps"] = float(spec.steps)
    figures["trainSeconds"] = time.perf_counter() - started
    return figures
