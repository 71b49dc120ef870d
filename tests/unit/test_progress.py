"""What the operator reads off the rank-0 trainer's /metrics: progress, goodput and energy (how the
attempt resumed is planner.resume's, tests/unit/test_planner_resume.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from llmop import progress
from llmop_contract.protocol import Metric

TEXT = f"""# TYPE {Metric.STEP} gauge
{Metric.STEP} 120
{Metric.TOTAL_STEPS} 400
{Metric.LOSS} 2.5
{Metric.CHECKPOINT_FALLBACKS} 1
{Metric.RESUMED_FROM_STEP} 100
"""


def test_progress_is_read_from_the_trainer_metric_names() -> None:
    values = progress.parse(TEXT)
    wire = progress.to_wire(values, datetime(2026, 12, 2, tzinfo=UTC))
    assert (wire["step"], wire["totalSteps"], wire["percent"]) == (120, 400, 30)
    # Not progress, but read with it: how the attempt resumed (planner.resume).
    assert (values["checkpointFallbacks"], values["resumedFromStep"]) == (1, 100)
    assert "checkpointFallbacks" not in wire and "resumedFromStep" not in wire


def test_goodput_is_productive_seconds_over_the_wall_time_since_start() -> None:
    values = progress.parse(f"{Metric.STEP} 50\n{Metric.PRODUCTIVE_SECONDS} 540.26\n")
    now = datetime(2026, 12, 2, 10, 10, tzinfo=UTC)
    wire = progress.to_wire(values, now, started="2026-12-02T10:00:00Z")
    assert wire["productiveSeconds"] == 540.3
    assert wire["goodput"] == round(540.26 / 600, 4)
    # No start time yet (or under a second of wall time): no share rather than a made-up one.
    assert "goodput" not in progress.to_wire(values, now)
    assert "goodput" not in progress.to_wire(values, now, started="2026-12-02T10:10:00Z")


def test_energy_is_reported_only_when_every_rank_measures_it() -> None:
    now = datetime(2026, 12, 2, tzinfo=UTC)
    # The trainer's gauges read 0 while energy is unavailable: that 0 is not a measurement.
    unavailable = progress.parse(f"{Metric.ENERGY_AVAILABLE} 0\n{Metric.ENERGY_JOULES} 0\n")
    wire = progress.to_wire(unavailable, now)
    assert wire["energyMeasured"] is False and "energyJoules" not in wire and "energyKwh" not in wire
    measured = progress.parse(
        f"{Metric.ENERGY_AVAILABLE} 1\n{Metric.ENERGY_JOULES} 7.2e6\n{Metric.JOULES_PER_TOKEN} 0.0123456\n"
    )
    wire = progress.to_wire(measured, now)
    assert (wire["energyMeasured"], wire["energyJoules"], wire["energyKwh"]) == (True, 7.2e6, 2.0)
    assert wire["joulesPerToken"] == 0.01235
    # An older trainer exports none of these: the fields stay absent.
    assert "energyMeasured" not in progress.to_wire(progress.parse(f"{Metric.STEP} 1\n"), now)


def test_recommended_checkpoint_interval_follows_daly_for_the_jobs_gpus() -> None:
    from llmop_contract import interval
    from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec

    spec = LLMTrainingJobSpec.model_validate(
        {
            "data": {"prepare": False},
            "training": {
                "maxSteps": 1000,
                "globalBatchSize": 64,
                "microBatchSize": 1,
                "sequenceLength": 256,
            },
            "workers": {"numNodes": 8, "procsPerNode": 8, "gpusPerNode": 8},
        }
    )
    now = datetime(2026, 12, 2, tzinfo=UTC)
    # 64 x 256 tokens per step at 8192 tokens/s: 2 s steps; a 30 s checkpoint on 64 GPUs.
    text = f"{Metric.TOKENS_PER_SECOND} 8192\n{Metric.CHECKPOINT_SECONDS} 30\n"
    wire = progress.to_status(progress.parse(text), now, spec=spec).to_wire()
    expected = interval.daly_interval(30, interval.mean_time_between_interruptions(64)) / 2.0
    assert wire["checkpointSeconds"] == 30 and wire["recommendedCheckpointIntervalSteps"] == round(expected)
    # Before the first checkpoint (the gauge reads 0) there is nothing to recommend from.
    before = progress.to_status(progress.parse(f"{Metric.TOKENS_PER_SECOND} 8192\n"), now, spec=spec)
    assert before.recommended_checkpoint_interval_steps is None
