"""Learning rate per optimiser step: linear warmup from zero, then cosine/linear decay or constant."""

from __future__ import annotations

import math

from llmop_contract.api.v1alpha1.training import LearningRateSchedule, ScheduleType, TrainingSpec


def learning_rate(step: int, total_steps: int, peak: float, sched: LearningRateSchedule) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total_steps``."""
    warmup = sched.effective_warmup_steps(total_steps)
    if step < warmup:
        # (step+1)/warmup so the very first step already moves the weights.
        return peak * (step + 1) / warmup
    if sched.type == ScheduleType.CONSTANT:
        return peak
    floor = peak * sched.min_learning_rate_ratio
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if sched.type == ScheduleType.LINEAR:
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(training: TrainingSpec) -> int:
    """maxSteps, or maxTokens rounded up to whole global batches of sequenceLength tokens."""
    if training.max_steps is not None:
        return training.max_steps
    assert training.max_tokens is not None  # the TrainingSpec rule guarantees exactly one is set
    per_step = training.global_batch_size * training.sequence_length
    return max(1, math.ceil(training.max_tokens / per_step))
