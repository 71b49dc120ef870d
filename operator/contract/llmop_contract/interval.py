"""The checkpoint interval that loses the least time to interruptions (Young 1974, Daly 2006).

Checkpointing every ``tau`` seconds costs ``delta`` (the write) per interval; an interruption loses on
average half an interval of work plus the restart. Minimising the expected waste over a mean time
between interruptions ``M`` gives Young's first-order ``tau = sqrt(2 delta M)``; Daly's higher-order
form, used here, stays accurate when ``delta`` is not small against ``M``:

    tau = sqrt(2 delta M) (1 + sqrt(delta / 2M) / 3 + (delta / 2M) / 9) - delta     for delta < 2M
    tau = M                                                                          otherwise

``M`` for a job is the platform's interruption rate scaled by the GPUs it holds. Without one observed,
the reference is Llama 3 405B's pretraining (Dubey et al. 2024, sec. 3.3.4): 466 job interruptions in
54 days on 16,384 GPUs, i.e. one per GPU every 54 x 24 x 16,384 / 466 = 45,570 GPU-hours.
"""

from __future__ import annotations

import math

LLAMA3_GPU_HOURS_PER_INTERRUPTION = 54 * 24 * 16_384 / 466


def mean_time_between_interruptions(gpus: int, gpu_hours_per_interruption: float | None = None) -> float:
    """Seconds between interruptions of a job on ``gpus`` GPUs (any one of them failing stops the gang)."""
    per_gpu = gpu_hours_per_interruption or LLAMA3_GPU_HOURS_PER_INTERRUPTION
    return per_gpu * 3600 / max(1, gpus)


def daly_interval(checkpoint_seconds: float, mtbf_seconds: float) -> float:
    """Seconds of training between checkpoints that minimise expected lost time."""
    delta, m = checkpoint_seconds, mtbf_seconds
    if delta <= 0:
        raise ValueError(f"checkpoint time must be positive, got {delta}")
    if delta >= 2 * m:
        return m
    x = delta / (2 * m)
    return math.sqrt(2 * delta * m) * (1 + math.sqrt(x) / 3 + x / 9) - delta


def interval_steps(checkpoint_seconds: float, step_seconds: float, mtbf_seconds: float) -> int:
    """The Daly interval in whole optimiser steps (at least 1)."""
    return max(1, round(daly_interval(checkpoint_seconds, mtbf_seconds) / step_seconds))


def expected_goodput(
    interval_seconds: float, checkpoint_seconds: float, restart_seconds: float, mtbf_seconds: float
) -> float:
    """First-order fraction of wall time spent on steps that count, for a fixed gang.

    Per interval of ``tau`` productive seconds: ``delta`` writing the checkpoint, and with probability
    ``(tau + delta) / M`` an interruption costing the restart plus half the interval recomputed.
    """
    tau, delta = interval_seconds, checkpoint_seconds
    lost = (tau + delta) / mtbf_seconds * (restart_seconds + (tau + delta) / 2)
    return tau / (tau + delta + lost)
