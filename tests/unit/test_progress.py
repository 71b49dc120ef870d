"""What the operator reads off the rank-0 trainer's /metrics: progress, and a resume that skipped
checkpoints which failed verification (reported as a Warning Event)."""

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


def test_progress_and_fallback_are_read_from_the_trainer_metric_names() -> None:
    values = progress.parse(TEXT)
    wire = progress.to_wire(values, datetime(2026, 12, 2, tzinfo=UTC))
    assert (wire["step"], wire["totalSteps"], wire["percent"]) == (120, 400, 30)
    message = progress.fallback_message(values)
    assert message and "1 checkpoint(s) failed verification" in message and "step 100" in message


def test_a_clean_resume_or_first_start_reports_nothing_and_scratch_is_named() -> None:
    assert progress.fallback_message(progress.parse(f"{Metric.STEP} 5\n")) is None
    assert progress.fallback_message(progress.parse(f"{Metric.CHECKPOINT_FALLBACKS} 0\n")) is None
    scratch = progress.fallback_message(
        progress.parse(f"{Metric.CHECKPOINT_FALLBACKS} 2\n{Metric.RESUMED_FROM_STEP} 0\n")
    )
    assert scratch and "started from scratch" in scratch
