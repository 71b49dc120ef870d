"""The planner's decisions, without a cluster: every branch of the failure policy and lifecycle."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from llmop.api.v1alpha1 import LLMTrainingJobSpec
from llmop.capacity import Fit
from llmop.conditions import is_true
from llmop.observe import BatchJobView, PodView
from llmop.reconcile import JobSnapshot, Observed, classify_failure, plan

NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)


def spec(**run_policy: Any) -> LLMTrainingJobSpec:
    return LLMTrainingJobSpec.model_validate(
        {
            "data": {"prepare": False},
            "training": {"maxSteps": 10, "globalBatchSize": 2, "microBatchSize": 1},
            "workers": {"numNodes": 2, "procsPerNode": 1, "gpusPerNode": 1},
            "runPolicy": run_policy,
        }
    )


def pod(index: int, attempt: int = 1, phase: str = "Running", **kw: Any) -> PodView:
    base = PodView(
        name=f"j-worker-{index}", index=index, attempt=attempt, phase=phase, ready=phase == "Running",
        deleting=False, gated=False, gates=(), node=f"n{index}", ip=f"127.1.0.{index + 1}", exit_code=None,
        reason="", message="", disrupted=False, unschedulable=None, gpus=1,
    )  # fmt: skip
    return replace(base, **kw)


def snapshot(s: LLMTrainingJobSpec, status: dict[str, Any] | None = None) -> JobSnapshot:
    return JobSnapshot("j", "ns", "uid", 1, s, status or {})


def running_status() -> dict[str, Any]:
    first = plan(snapshot(spec()), Observed([pod(0), pod(1)], None, NOW))
    return first.status


def test_new_job_creates_base_and_whole_gang() -> None:
    p = plan(snapshot(spec()), Observed([], None, NOW))
    assert p.ensure_base and p.create_workers == [0, 1]
    assert p.status["attempt"] == 1 and p.status["state"] == "Starting"
    assert [t.type for t in p.transitions] == ["Created"]


def test_running_only_when_every_worker_runs() -> None:
    partial = plan(snapshot(spec()), Observed([pod(0), pod(1, phase="Pending")], None, NOW))
    assert partial.status["state"] == "Starting" and not is_true(partial.status["conditions"], "Running")
    full = plan(snapshot(spec()), Observed([pod(0), pod(1)], None, NOW))
    assert full.status["state"] == "Running" and is_true(full.status["conditions"], "Running")
    assert full.gang_running_since == NOW


def test_prepare_job_gates_training() -> None:
    s = spec().model_copy(update={"data": spec().data.model_copy(update={"prepare": True})})
    p = plan(snapshot(s), Observed([], None, NOW))
    assert p.create_prepare and not p.create_workers and p.status["state"] == "Preparing"
    done = BatchJobView("j-prepare", succeeded=True, failed=False, message="", active=0)
    p2 = plan(snapshot(s, p.status), Observed([], done, NOW))
    assert p2.create_workers == [0, 1]
    failed = BatchJobView("j-prepare", succeeded=False, failed=True, message="BackoffLimitExceeded", active=0)
    p3 = plan(snapshot(s, p.status), Observed([], failed, NOW))
    assert p3.status["state"] == "Failed" and not p3.create_workers


def test_retryable_failure_restarts_gang_and_counts() -> None:
    status = running_status()
    p = plan(snapshot(spec(), status), Observed([pod(0), pod(1, phase="Failed", exit_code=1)], None, NOW))
    assert p.status["restartCount"] == 1 and p.status["attempt"] == 2
    assert sorted(p.delete_pods) == ["j-worker-0", "j-worker-1"] and not p.create_workers
    # Next pass: old pods still terminating -> wait, never a second gang beside them.
    stale = [pod(0, deleting=True), pod(1, phase="Failed", exit_code=1)]
    p2 = plan(snapshot(spec(), p.status), Observed(stale, None, NOW))
    assert not p2.create_workers and p2.status["restartCount"] == 1 and p2.status["state"] == "Restarting"
    p3 = plan(snapshot(spec(), p2.status), Observed([], None, NOW))
    assert p3.create_workers == [0, 1] and p3.status["restartCount"] == 1


def test_replaying_the_same_failure_does_not_count_twice() -> None:
    status = running_status()
    seen = Observed([pod(0), pod(1, phase="Failed", exit_code=1)], None, NOW)
    once = plan(snapshot(spec(), status), seen)
    # The operator crashed after writing status but before deleting: same pods seen again.
    again = plan(snapshot(spec(), once.status), seen)
    assert again.status["restartCount"] == 1 and sorted(again.delete_pods) == ["j-worker-0", "j-worker-1"]


def test_backoff_limit_then_failed() -> None:
    status = {**running_status(), "restartCount": 2}
    p = plan(
        snapshot(spec(backoffLimit=2), status),
        Observed([pod(0, phase="Failed", exit_code=1), pod(1)], None, NOW),
    )
    assert p.status["state"] == "Failed"
    assert any(t.type == "Failed" and t.reason == "BackoffLimitExceeded" for t in p.transitions)


@pytest.mark.parametrize("kind", ["evicted", "preempted-exit-75", "disruption-condition"])
def test_disruptions_do_not_count(kind: str) -> None:
    failed = {
        "evicted": pod(1, phase="Failed", reason="Evicted", disrupted=True),
        "preempted-exit-75": pod(1, phase="Failed", exit_code=75, disrupted=True),
        "disruption-condition": pod(1, phase="Failed", exit_code=137, disrupted=True),
    }[kind]
    p = plan(snapshot(spec(backoffLimit=0), running_status()), Observed([pod(0), failed], None, NOW))
    assert p.status["restartCount"] == 0 and p.status["disruptionCount"] == 1 and p.status["attempt"] == 2


def test_worker_vanishing_from_running_gang_restarts_it() -> None:
    p = plan(snapshot(spec(), running_status()), Observed([pod(0)], None, NOW))
    assert p.status["attempt"] == 2 and p.status["restartCount"] == 0 and p.delete_pods == ["j-worker-0"]


@pytest.mark.parametrize(
    ("policy", "code", "expected"),
    [
        ({}, 1, "retryable"),
        ({"restartPolicy": "Never"}, 1, "permanent"),
        ({"restartPolicy": "ExitCode"}, 2, "permanent"),
        ({"restartPolicy": "ExitCode"}, 137, "retryable"),
        (
            {"restartPolicy": "ExitCode", "exitCodeRules": [{"action": "Restart", "exitCodes": [3]}]},
            3,
            "retryable",
        ),
        ({"exitCodeRules": [{"action": "Fail", "exitCodes": [42]}]}, 42, "permanent"),
    ],
)
def test_exit_code_rules(policy: dict[str, Any], code: int, expected: str) -> None:
    assert classify_failure(spec(**policy), pod(0, phase="Failed", exit_code=code)) == expected


def test_all_succeeded_completes_job_and_ttl_requeues() -> None:
    p = plan(
        snapshot(spec(ttlSecondsAfterFinished=60), running_status()),
        Observed([pod(0, phase="Succeeded"), pod(1, phase="Succeeded")], None, NOW),
    )
    assert p.status["state"] == "Succeeded" and p.status["completionTime"] == "2026-11-24T12:00:00Z"
    assert p.requeue_after == 60 and not p.delete_job
    later = plan(
        snapshot(spec(ttlSecondsAfterFinished=60), p.status), Observed([], None, NOW + timedelta(seconds=61))
    )
    assert later.delete_job


def test_deadline_fails_and_deletes_pods() -> None:
    status = {**running_status(), "startTime": "2026-11-24T11:00:00Z"}
    p = plan(snapshot(spec(activeDeadlineSeconds=600), status), Observed([pod(0), pod(1)], None, NOW))
    assert p.status["state"] == "Failed" and sorted(p.delete_pods) == ["j-worker-0", "j-worker-1"]


def test_suspend_keeps_counts_and_resume_starts_new_attempt() -> None:
    status = running_status()
    s = plan(snapshot(spec(suspend=True), status), Observed([pod(0), pod(1)], None, NOW))
    assert s.status["state"] == "Suspended" and len(s.delete_pods) == 2
    r = plan(snapshot(spec(), s.status), Observed([], None, NOW))
    assert r.status["attempt"] == 2 and r.create_workers == [0, 1] and r.status.get("restartCount", 0) == 0


def test_gated_gang_released_only_when_it_fits() -> None:
    gated = [pod(0, phase="Pending", gated=True), pod(1, phase="Pending", gated=True)]
    no = plan(
        snapshot(spec()), Observed(gated, None, NOW, fit=Fit(False, 1, 2, "needs 2 nodes; 1 available"))
    )
    assert not no.ungate and no.status["state"] == "Pending" and no.requeue_after == 2.0
    assert (
        any(t.type == "GangScheduled" for t in no.transitions) is False
    )  # False on first appearance: no event
    yes = plan(snapshot(spec(), no.status), Observed(gated, None, NOW, fit=Fit(True, 2, 2, "fits")))
    assert sorted(yes.ungate) == ["j-worker-0", "j-worker-1"]


def test_plan_is_deterministic() -> None:
    job, seen = (
        snapshot(spec(), running_status()),
        Observed([pod(0), pod(1, phase="Failed", exit_code=1)], None, NOW),
    )
    assert plan(job, seen) == plan(job, seen)
