"""The recommended checkpoint interval (Young/Daly) against the waste it is meant to minimise."""

from __future__ import annotations

import math

import pytest

from llmop_contract import interval


def test_mtbf_scales_llama3s_rate_by_gpus() -> None:
    # Llama 3: 466 interruptions in 54 days on 16,384 GPUs -> one every 54 * 24 / 466 hours.
    assert interval.mean_time_between_interruptions(16_384) / 3600 == pytest.approx(54 * 24 / 466)
    assert interval.mean_time_between_interruptions(1024) == pytest.approx(
        16 * interval.mean_time_between_interruptions(16_384)
    )


@pytest.mark.parametrize("checkpoint_seconds", [2.0, 30.0, 600.0])
def test_daly_interval_maximises_expected_goodput(checkpoint_seconds: float) -> None:
    mtbf, restart = interval.mean_time_between_interruptions(1024), 300.0
    best = interval.daly_interval(checkpoint_seconds, mtbf)
    at_best = interval.expected_goodput(best, checkpoint_seconds, restart, mtbf)
    for factor in (0.25, 0.5, 0.8, 1.25, 2.0, 4.0):
        other = interval.expected_goodput(best * factor, checkpoint_seconds, restart, mtbf)
        assert other < at_best + 1e-4, (factor, other, at_best)
    # Small checkpoints: Daly's correction is a few per cent on Young's sqrt(2 delta M).
    young = math.sqrt(2 * checkpoint_seconds * mtbf)
    assert abs(best - young) / young < 0.05


def test_checkpoint_longer_than_twice_the_mtbf_checkpoints_once_per_mtbf() -> None:
    assert interval.daly_interval(100.0, 40.0) == 40.0
    with pytest.raises(ValueError, match="positive"):
        interval.daly_interval(0.0, 40.0)


def test_interval_in_steps() -> None:
    mtbf = interval.mean_time_between_interruptions(1024)
    steps = interval.interval_steps(30.0, 2.0, mtbf)
    assert steps == round(interval.daly_interval(30.0, mtbf) / 2.0) and steps > 1
    assert interval.interval_steps(1.0, 1e6, mtbf) == 1
