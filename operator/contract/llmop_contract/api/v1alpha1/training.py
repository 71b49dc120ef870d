"""The optimisation itself: steps, batches, optimiser, schedule, precision and DeepSpeed settings."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

from pydantic import Field

from llmop_contract.api.base import ApiModel, Rule
from llmop_contract.sources import SourceKind, parse, source_problem


class OptimizerType(StrEnum):
    ADAMW = "AdamW"
    ADAM = "Adam"
    SGD = "SGD"


class Optimizer(ApiModel):
    """Optimiser and its hyperparameters."""

    type: OptimizerType = OptimizerType.ADAMW
    """AdamW (decoupled weight decay), Adam, or SGD with momentum."""
    learning_rate: float = Field(3e-4, gt=0, le=10)
    """Peak learning rate, reached at the end of warmup."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """Adam first-moment decay."""
    beta2: float = Field(0.95, ge=0, lt=1)
    """Adam second-moment decay."""
    epsilon: float = Field(1e-8, gt=0, le=1)
    """Adam denominator epsilon."""
    weight_decay: float = Field(0.1, ge=0, le=10)
    """Decoupled weight decay (AdamW) or L2 added to the gradient (Adam, SGD)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""
    nesterov: bool = False
    """Nesterov momentum for SGD."""


class ScheduleType(StrEnum):
    COSINE = "Cosine"
    LINEAR = "Linear"
    CONSTANT = "Constant"


class LearningRateSchedule(ApiModel):
    """Linear warmup followed by a decay to minLearningRateRatio x the peak."""

    type: ScheduleType = ScheduleType.COSINE
    """Decay shape after warmup."""
    warmup_steps: int | None = Field(None, ge=0, le=10_000_000)
    """Steps of linear warmup from zero, at most the run's steps; unset warms up for min(100, steps / 10) steps (a tenth of a short run)."""
    min_learning_rate_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of the peak."""

    def effective_warmup_steps(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps``: warmupSteps, or the default for its length."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        # A fixed 100 would leave a short run (tests, smoke runs) below its peak learning rate.
        return min(DEFAULT_WARMUP_STEPS, total_steps // 10)


DEFAULT_WARMUP_STEPS = 100


class Precision(StrEnum):
    BF16 = "BF16"
    FP16 = "FP16"
    FP32 = "FP32"


class Regularization(ApiModel):
    """Penalties added to the loss, and dropout."""

    l1: float = Field(0.0, ge=0, le=1)
    """Coefficient of the L1 norm of the weights added to the loss."""
    l2: float = Field(0.0, ge=0, le=1)
    """Coefficient of the squared L2 norm of the weights added to the loss."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout probability in attention and feed-forward outputs."""


class Sparsity(ApiModel):
    """Dynamic sparsity: gradual magnitude pruning during training (Zhu & Gupta cubic schedule)."""

    rules = (
        Rule(
            "self.endStep > self.startStep",
            lambda m: m.end_step > m.start_step,
            "endStep must be greater than startStep",
            ".endStep",
        ),
    )

    enabled: bool = False
    """Prune during training."""
    target_sparsity: float = Field(0.5, ge=0, lt=1)
    """Fraction of weights in linear layers that are zero at endStep."""
    start_step: int = Field(0, ge=0)
    """First pruning step."""
    end_step: int = Field(1000, ge=1)
    """Step at which targetSparsity is reached."""
    frequency: int = Field(100, ge=1)
    """Steps between mask updates."""


class Method(StrEnum):
    FULL = "Full"
    LORA = "LoRA"
    QLORA = "QLoRA"


class LoRA(ApiModel):
    """Low-rank adapters (peft): only the adapters train, the base weights stay frozen."""

    rank: int = Field(16, ge=1, le=1024)
    """Rank r of each adapter's A (r x in) and B (out x r) matrices."""
    alpha: float = Field(32.0, gt=0, le=4096)
    """Scaling numerator: the update is (alpha / rank) x B A."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input."""
    target_modules: list[str] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"items": {"type": "string", "minLength": 1, "maxLength": 256}},
    )
    """Module names (or name suffixes, e.g. q_proj, v_proj) that get adapters; empty adapts every linear layer but the output head (peft's all-linear)."""


def _resume_problem(uri: str) -> str | None:
    if (problem := source_problem(uri)) is not None:
        return problem
    return "a hub repository holds no training checkpoint" if parse(uri).kind is SourceKind.HUB else None


class Checkpointing(ApiModel):
    """When checkpoints are written to storage."""

    rules = (
        Rule(
            "!has(self.resumeFrom) || (self.resumeFrom.matches('^[a-z][a-z0-9+.-]*://')"
            " ? self.resumeFrom.matches('^(s3|gs|gcs|az|abfs)://[^/]+.*|^file:///.*')"
            " : !self.resumeFrom.startsWith('-'))",
            lambda m: m.resume_from is None or _resume_problem(m.resume_from) is None,
            "resumeFrom must be an object-store URL (s3://, gs://, az://), file:///ABSOLUTE/PATH or a path",
            ".resumeFrom",
        ),
    )

    interval_steps: int = Field(500, ge=1)
    """Steps between checkpoints (one is also written on SIGTERM and at the end); with automaticInterval, the steps until the first."""
    automatic_interval: bool = False
    """After each checkpoint, the steps until the next one are Daly's optimum from the save just timed, the mean step time and an interruption rate of one per 45,570 GPU-hours (Llama 3's) scaled to the job's devices; status.progress.recommendedCheckpointIntervalSteps shows the same figure as advice either way."""
    keep_last: int = Field(3, ge=1, le=1000)
    """Checkpoints kept (on the volume, and under storage.remote); older ones are deleted after a newer one is complete."""
    resume_from: str | None = Field(None, min_length=1, max_length=2048)
    """A checkpoint directory (step-N) written by another job, as an object-store URL or a path: this job starts from its weights, optimizer state and step when it has no checkpoint of its own."""


class Evaluation(ApiModel):
    """Validation on the held-out split."""

    interval_steps: int = Field(200, ge=1)
    """Steps between evaluations."""
    max_batches: int = Field(20, ge=1, le=100_000)
    """Batches per evaluation."""


def _within_steps(cel: str) -> str:
    """CEL: the step ``cel`` is reached by the run (maxSteps, or maxTokens in whole global batches).

    With maxTokens the run has ceil(maxTokens / (globalBatchSize x sequenceLength)) steps, and
    s <= ceil(T / P) exactly when (s - 1) x P < T; in doubles, as the product can overflow an int.
    The guard leaves a spec with neither or both to the rule that says so.
    """
    return (
        f"has(self.maxSteps) == has(self.maxTokens) || (has(self.maxSteps) ? {cel} <= self.maxSteps"
        f" : double({cel} - 1) * double(self.globalBatchSize) * double(self.sequenceLength)"
        " < double(self.maxTokens))"
    )


def _reached(m: TrainingSpec, step: int) -> bool:
    return (m.max_steps is None) == (m.max_tokens is None) or step <= m.total_steps


class TrainingSpec(ApiModel):
    """The training loop."""

    rules = (
        Rule(
            "has(self.maxSteps) != has(self.maxTokens)",
            lambda m: (m.max_steps is None) != (m.max_tokens is None),
            "exactly one of maxSteps or maxTokens must be set",
            ".maxSteps",
        ),
        Rule(
            f"!has(self.lrSchedule.warmupSteps) || {_within_steps('self.lrSchedule.warmupSteps')}",
            lambda m: m.lr_schedule.warmup_steps is None or _reached(m, m.lr_schedule.warmup_steps),
            "lrSchedule.warmupSteps must not exceed maxSteps (or the steps maxTokens gives):"
            " the learning rate would never reach its peak",
            ".lrSchedule.warmupSteps",
        ),
        Rule(
            "self.method != 'Full' || !has(self.lora)",
            lambda m: m.method != Method.FULL or m.lora is None,
            "training.lora applies only to method LoRA or QLoRA",
            ".lora",
        ),
        Rule(
            f"!self.sparsity.enabled || {_within_steps('self.sparsity.endStep')}",
            lambda m: not m.sparsity.enabled or _reached(m, m.sparsity.end_step),
            "sparsity.endStep must not exceed maxSteps (or the steps maxTokens gives):"
            " the model would never reach sparsity.targetSparsity",
            ".sparsity.endStep",
        ),
    )

    method: Method = Method.FULL
    """Full (every weight trains), LoRA (adapters on a frozen base) or QLoRA (adapters on a 4-bit base; GPUs only)."""
    lora: LoRA | None = None
    """Adapter settings for LoRA and QLoRA; unset takes the defaults."""
    max_steps: int | None = Field(None, ge=1, le=1_000_000_000)
    """Optimiser steps to train for (set this or maxTokens)."""
    max_tokens: int | None = Field(None, ge=1)
    """Tokens to train on; converted to steps using the global batch size and sequence length."""
    sequence_length: int = Field(256, ge=8, le=131072)
    """Tokens per training sample; at most model.contextLength."""
    micro_batch_size: int = Field(8, ge=1, le=4096)
    """Samples per process per forward/backward pass."""
    global_batch_size: int = Field(8, ge=1, le=1_000_000)
    """Samples per optimiser step over all processes; a multiple of microBatchSize x processes (the quotient is gradient accumulation)."""
    optimizer: Optimizer = Field(default_factory=Optimizer)
    """Optimiser."""
    lr_schedule: LearningRateSchedule = Field(default_factory=LearningRateSchedule)
    """Learning-rate schedule."""
    precision: Precision = Precision.BF16
    """Training precision: BF16 or FP16 mixed precision with FP32 master weights, or FP32."""
    gradient_clipping: float = Field(1.0, ge=0, le=1000)
    """Clip the global gradient norm to this value; 0 disables clipping."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory."""
    regularization: Regularization = Field(default_factory=Regularization)
    """Regularisation."""
    sparsity: Sparsity = Field(default_factory=Sparsity)
    """Dynamic sparsity."""
    checkpointing: Checkpointing = Field(default_factory=Checkpointing)
    """Checkpoints."""
    evaluation: Evaluation = Field(default_factory=Evaluation)
    """Validation."""
    log_interval_steps: int = Field(10, ge=1)
    """Steps between progress log lines and metric updates."""
    seed: int = Field(1234, ge=0)
    """Seed for initialisation, data order and dropout."""

    @property
    def adapters(self) -> LoRA | None:
        """The adapter settings in effect: None for Full fine-tuning."""
        if self.method == Method.FULL:
            return None
        return self.lora or LoRA()

    @property
    def total_steps(self) -> int:
        """maxSteps, or maxTokens rounded up to whole global batches of sequenceLength tokens."""
        if self.max_steps is not None:
            return self.max_steps
        assert self.max_tokens is not None  # the first rule guarantees exactly one is set
        return max(1, math.ceil(self.max_tokens / (self.global_batch_size * self.sequence_length)))


class Offload(StrEnum):
    NONE = "None"
    CPU = "CPU"


class Communication(ApiModel):
    """ZeRO communication tuning."""

    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    contiguous_gradients: bool = True
    """Copy gradients into a contiguous buffer as they are produced."""
    reduce_bucket_size: int = Field(500_000_000, ge=1000)
    """Elements reduced at a time."""
    allgather_bucket_size: int = Field(500_000_000, ge=1000)
    """Elements all-gathered at a time (ZeRO 1-2)."""


class DeepSpeedSpec(ApiModel):
    """DeepSpeed engine settings; the trainer renders them into a DeepSpeed config."""

    rules = (
        Rule(
            "self.offloadOptimizer == 'None' || self.zeroStage >= 1",
            lambda m: m.offload_optimizer == Offload.NONE or m.zero_stage >= 1,
            "offloadOptimizer needs zeroStage 1, 2 or 3",
            ".offloadOptimizer",
        ),
        Rule(
            "self.offloadParameters == 'None' || self.zeroStage == 3",
            lambda m: m.offload_parameters == Offload.NONE or m.zero_stage == 3,
            "offloadParameters needs zeroStage 3",
            ".offloadParameters",
        ),
    )

    zero_stage: int = Field(2, ge=0, le=3)
    """ZeRO stage: 0 off, 1 optimiser states, 2 plus gradients, 3 plus parameters partitioned."""
    offload_optimizer: Offload = Offload.NONE
    """Keep optimiser states (and the step) on the CPU."""
    offload_parameters: Offload = Offload.NONE
    """Keep parameters on the CPU between uses (ZeRO 3 only)."""
    communication: Communication = Field(default_factory=Communication)
    """Communication tuning."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Raw DeepSpeed config keys merged over the rendered config last (expert use)."""
