"""When the next checkpoint is due: every ``intervalSteps``, or Daly's interval when asked for.

With ``checkpointing.automaticInterval`` the first checkpoint comes after ``intervalSteps``; each save
is timed, and the steps until the next one are ``llmop_contract.interval.interval_steps`` of that time,
the mean step time since the previous save and the interruption rate scaled to the devices of the
running world (an elastic gang's current size): the same figure the operator shows as advice in
``status.progress.recommendedCheckpointIntervalSteps``.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmop_contract import interval
from llmop_contract.api.v1alpha1.training import Checkpointing


@dataclass
class Cadence:
    config: Checkpointing
    devices: int  # GPUs of the running world (processes on CPU): what the interruption rate scales with
    next_step: int = 0  # automatic: the step the next checkpoint is due at

    def start(self, step: int) -> None:
        """Training (re)starts at ``step``: the first interval counts from there."""
        self.next_step = step + self.config.interval_steps

    def due(self, step: int) -> bool:
        if self.config.automatic_interval:
            return step >= self.next_step
        return step % self.config.interval_steps == 0

    def saved(self, step: int, save_seconds: float, step_seconds: float) -> int | None:
        """A checkpoint of ``step`` took ``save_seconds``; returns the new interval when automatic."""
        if not self.config.automatic_interval or save_seconds <= 0 or step_seconds <= 0:
            return None
        mtbf = interval.mean_time_between_interruptions(self.devices)
        steps = interval.interval_steps(save_seconds, step_seconds, mtbf)
        self.next_step = step + steps
        return steps
