"""The learning-rate warmup: a default that fits short runs, and no explicit warmup past the end."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from llmop_contract.api.v1alpha1.training import LearningRateSchedule, TrainingSpec
from llmtrain.train.schedule import learning_rate, total_steps


def training(**fields: Any) -> TrainingSpec:
    return TrainingSpec.model_validate({"maxSteps": 1000, **fields})


@pytest.mark.parametrize(("steps", "warmup"), [(1000, 100), (5000, 100), (300, 30), (30, 3), (5, 0)])
def test_unset_warmup_is_a_tenth_of_the_run_up_to_100_steps(steps: int, warmup: int) -> None:
    t = training(maxSteps=steps)
    assert t.lr_schedule.warmup_steps is None
    assert t.lr_schedule.effective_warmup_steps(t.total_steps) == warmup


def test_unset_warmup_of_a_max_tokens_run_follows_its_steps() -> None:
    # 8 samples of 256 tokens a step: 307200 tokens are 150 steps.
    t = training(maxSteps=None, maxTokens=307200)
    assert t.total_steps == total_steps(t) == 150
    assert t.lr_schedule.effective_warmup_steps(t.total_steps) == 15


def test_an_explicit_warmup_is_kept() -> None:
    assert training(lrSchedule={"warmupSteps": 0}).lr_schedule.effective_warmup_steps(1000) == 0
    assert training(lrSchedule={"warmupSteps": 1000}).lr_schedule.effective_warmup_steps(1000) == 1000


def test_a_short_run_reaches_its_peak_learning_rate_by_default() -> None:
    sched = LearningRateSchedule()
    rates = [learning_rate(step, 30, 1e-3, sched) for step in range(30)]
    assert rates[0] < rates[2] and rates[2] == pytest.approx(1e-3)  # peak after 3 warmup steps
    assert max(rates) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "fields",
    [
        {"maxSteps": 100},
        {"maxSteps": None, "maxTokens": 204800},  # exactly 100 steps
        {"maxSteps": None, "maxTokens": 202753},  # 99 steps and one token: rounds up to 100
    ],
)
def test_warmup_may_last_the_whole_run_but_not_longer(fields: dict[str, Any]) -> None:
    assert training(**fields, lrSchedule={"warmupSteps": 100}).total_steps == 100
    with pytest.raises(ValidationError, match=r"lrSchedule\.warmupSteps must not exceed maxSteps"):
        training(**fields, lrSchedule={"warmupSteps": 101})


def test_sparsity_must_reach_its_target_within_the_run() -> None:
    training(maxSteps=100, sparsity={"enabled": True, "endStep": 100})
    training(maxSteps=100, sparsity={"enabled": False, "endStep": 1000})  # off: not checked
    with pytest.raises(ValidationError, match=r"sparsity\.endStep must not exceed maxSteps"):
        training(maxSteps=100, sparsity={"enabled": True})  # the default endStep is 1000
