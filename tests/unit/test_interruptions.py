"""status.interruptions: each gang restart and the time it lost, filled in from the progress read
from the attempt that resumed."""

from __future__ import annotations

from datetime import timedelta

from llmop import progress
from llmop_contract.api.v1alpha1.status import LLMTrainingJobStatus
from tests.unit.test_planner import NOW, Observed, plan, pod, running_status, snapshot, spec
from tests.unit.test_planner_elastic import GRACE, elastic, gated, short


def test_a_restart_records_the_step_reached_and_what_catching_up_cost() -> None:
    status = {**running_status(), "progress": {"step": 40}}
    failed = plan(
        snapshot(spec(), status), Observed([pod(0), pod(1, phase="Failed", exit_code=1)], None, NOW)
    )
    [entry] = failed.status["interruptions"]
    assert (entry["attempt"], entry["reason"], entry["stepBefore"]) == (2, "WorkerFailed", 40)
    resumed = LLMTrainingJobStatus.model_validate(failed.status)
    # The new attempt resumed from the step-30 checkpoint and is recomputing: not back yet.
    assert (
        progress.settle_interruption(
            resumed, {"resumedFromStep": 30, "step": 35}, NOW + timedelta(seconds=30)
        )
        is None
    )
    assert (resumed.interruptions[-1].resumed_from_step, resumed.interruptions[-1].recomputed_steps) == (
        30,
        10,
    )
    lost = progress.settle_interruption(
        resumed, {"resumedFromStep": 30, "step": 41}, NOW + timedelta(seconds=52)
    )
    assert lost == 52.0 and resumed.interruptions[-1].lost_seconds == 52.0
    assert progress.settle_interruption(resumed, {"step": 60}, NOW + timedelta(seconds=90)) is None  # once


def test_a_node_lost_then_a_shrink_is_one_interruption_counted_from_the_loss() -> None:
    s = elastic(minNodes=1)
    status = {**running_status(), "progress": {"step": 12}}
    lost = plan(snapshot(s, status), Observed([pod(0), pod(1)], None, NOW, lost_nodes={"n1": "was deleted"}))
    waiting = plan(
        snapshot(s, lost.status), Observed(gated(2, 2), None, NOW + timedelta(seconds=1), fit=short(1))
    )
    shrunk = plan(
        snapshot(s, waiting.status),
        Observed(gated(2, 2), None, NOW + timedelta(seconds=GRACE + 1), fit=short(1)),
    )
    assert shrunk.status["attempt"] == 3
    [entry] = shrunk.status["interruptions"]
    assert (entry["attempt"], entry["reason"], entry["stepBefore"]) == (3, "NodeLost", 12)
    assert entry["time"] == lost.status["interruptions"][0]["time"]
