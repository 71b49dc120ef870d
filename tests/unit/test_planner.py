"""The planner's decisions, without a cluster: every branch of the failure policy and lifecycle."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from llmop import planner
from llmop.capacity import Fit
from llmop.conditions import is_true, now_iso
from llmop.observe import BatchJobView, PodView
from llmop.planner import JobSnapshot, Observed, classify_failure
from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.status import LLMTrainingJobStatus

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


@dataclass
class Plan:
    """A pass's plan with its status as the controller writes it (the manifest, camelCase)."""

    typed: planner.Plan
    status: dict[str, Any]
    finished_stages: list[dict[str, Any]]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.typed, name)


def plan(job: JobSnapshot, seen: Observed) -> Plan:
    p = planner.plan(job, seen)
    return Plan(p, p.status.to_wire(), [s.to_wire() for s in p.finished_stages])


def snapshot(s: LLMTrainingJobSpec, status: dict[str, Any] | None = None) -> JobSnapshot:
    """The job as a daemon reads it: the stored status (a manifest) parsed into the status model."""
    return JobSnapshot("j", "ns", "uid", 1, s, LLMTrainingJobStatus.model_validate(status or {}))


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


def test_deadline_is_measured_from_start_time_by_the_observed_clock() -> None:
    start = NOW - timedelta(seconds=599)
    status = {**running_status(), "startTime": now_iso(start)}
    before = plan(snapshot(spec(activeDeadlineSeconds=600), status), Observed([pod(0), pod(1)], None, NOW))
    assert before.status["state"] == "Running" and not before.delete_pods
    assert before.requeue_after == 1.0, "the next pass is due exactly when the deadline passes"
    at = plan(
        snapshot(spec(activeDeadlineSeconds=600), before.status),
        Observed([pod(0), pod(1)], None, start + timedelta(seconds=600)),
    )
    assert at.status["state"] == "Failed" and sorted(at.delete_pods) == ["j-worker-0", "j-worker-1"]
    failed = next(c for c in at.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "DeadlineExceeded" and "activeDeadlineSeconds=600" in failed["message"]


# Observations a pass can see, each with the spec it runs under and the status of the pass before.
def _replays() -> list[tuple[str, LLMTrainingJobSpec, dict[str, Any], Observed]]:
    running = running_status()
    two = [pod(0), pod(1)]
    gated = [pod(0, phase="Pending", gated=True), pod(1, phase="Pending", gated=True)]
    return [
        ("new job", spec(), {}, Observed([], None, NOW)),
        ("gang starting", spec(), {}, Observed([pod(0), pod(1, phase="Pending")], None, NOW)),
        ("gang running", spec(), {}, Observed(two, None, NOW)),
        ("worker failed", spec(), running, Observed([pod(0), pod(1, phase="Failed", exit_code=1)], None, NOW)),
        ("worker evicted", spec(), running, Observed([pod(0), pod(1, phase="Failed", disrupted=True)], None, NOW)),
        ("worker lost", spec(), running, Observed([pod(0)], None, NOW)),
        ("permanent failure", spec(restartPolicy="Never"), running, Observed([pod(0, phase="Failed", exit_code=1), pod(1)], None, NOW)),
        ("backoff exhausted", spec(backoffLimit=0), running, Observed([pod(0, phase="Failed", exit_code=1), pod(1)], None, NOW)),
        ("succeeded", spec(ttlSecondsAfterFinished=60), running, Observed([pod(0, phase="Succeeded"), pod(1, phase="Succeeded")], None, NOW)),
        ("deadline", spec(activeDeadlineSeconds=60), {**running, "startTime": "2026-11-24T11:00:00Z"}, Observed(two, None, NOW)),
        ("suspended", spec(suspend=True), running, Observed(two, None, NOW)),
        ("resumed", spec(), plan(snapshot(spec(suspend=True), running), Observed(two, None, NOW)).status, Observed([], None, NOW)),
        ("no capacity", spec(), {}, Observed(gated, None, NOW, fit=Fit(False, 1, 2, "needs 2 nodes"))),
        ("capacity", spec(), {}, Observed(gated, None, NOW, fit=Fit(True, 2, 2, "fits"))),
    ]  # fmt: skip


def _pod_actions(p: Plan) -> tuple[Any, ...]:
    return (p.create_workers, sorted(p.ungate), p.delete_job, p.requeue_after)


@pytest.mark.parametrize(("s", "status", "seen"), [r[1:] for r in _replays()], ids=[r[0] for r in _replays()])
def test_a_pass_replayed_on_the_same_observation_changes_nothing_more(
    s: LLMTrainingJobSpec, status: dict[str, Any], seen: Observed
) -> None:
    """The watch lags the operator's own writes: the next pass may see the very same pods with the
    status the last pass wrote. It must neither move the status on (count a failure twice, start a
    third attempt) nor report a transition again; what it asks of the pods is the same, idempotent,
    request again (a failed job's already-finished pods may be left alone). And the planner must
    not write into the status it was given."""
    given = copy.deepcopy(status)
    first = plan(snapshot(s, status), seen)
    assert status == given, "plan() modified the status it was given"
    assert first.transitions or first.status != given, "the first pass must decide something"
    again = plan(snapshot(s, first.status), seen)
    assert again.status == first.status
    assert again.transitions == []
    assert again.gang_running_since is None, "time to Running is observed once per attempt"
    assert _pod_actions(again) == _pod_actions(first)
    live = {x.name for x in seen.pods if x.phase in ("Pending", "Running")}
    assert set(first.delete_pods) & live <= set(again.delete_pods) <= set(first.delete_pods)


def _carry_out(p: Plan, pods: list[PodView]) -> list[PodView]:
    """The cluster once a pass's pod actions are done; new workers start Running at once."""
    kept = [x for x in pods if x.name not in p.delete_pods]
    return kept + [pod(i, attempt=p.status["attempt"]) for i in p.create_workers]


def _until_settled(
    s: LLMTrainingJobSpec, status: dict[str, Any], pods: list[PodView]
) -> tuple[Plan, list[PodView]]:
    """Pass after pass, each seeing what the last one did, until a pass asks for nothing."""
    for _ in range(10):
        p = plan(snapshot(s, status), Observed(pods, None, NOW))
        assert len({x.attempt for x in pods}) <= 1, f"two gangs at once: {pods}"
        if not (p.create_workers or p.delete_pods or p.ensure_base):
            return p, pods
        status, pods = p.status, _carry_out(p, pods)
    raise AssertionError(f"no fixed point after 10 passes: {status}")


def test_passes_converge_through_a_restart_and_then_ask_for_nothing() -> None:
    settled, pods = _until_settled(spec(), {}, [])
    assert settled.status["state"] == "Running" and settled.status["attempt"] == 1
    assert [(x.index, x.attempt) for x in pods] == [(0, 1), (1, 1)]
    failed = [pods[0], replace(pods[1], phase="Failed", exit_code=1)]
    settled, pods = _until_settled(spec(), settled.status, failed)
    assert settled.status["state"] == "Running"
    assert settled.status["attempt"] == 2 and settled.status["restartCount"] == 1
    assert [(x.index, x.attempt) for x in pods] == [(0, 2), (1, 2)]
    assert plan(snapshot(spec(), settled.status), Observed(pods, None, NOW)).status == settled.status


def test_the_status_a_pass_writes_reads_back_unchanged() -> None:
    for _, s, status, seen in _replays():
        written = plan(snapshot(s, status), seen).status
        assert LLMTrainingJobStatus.model_validate(written).to_wire() == written


def test_one_deadline_rule_for_jobs_and_searches() -> None:
    from llmop import deadline

    start = NOW - timedelta(seconds=599)
    assert deadline.remaining(now_iso(start), None, NOW) is None
    assert deadline.remaining(now_iso(start), 600, NOW) == 1.0 and not deadline.exceeded(start, 600, NOW)
    assert deadline.exceeded(now_iso(start), 599, NOW) and deadline.exceeded(start, 10, NOW)
    assert not deadline.exceeded(None, 600, NOW), "not started yet: the clock starts now"
    assert (
        deadline.message("job", "activeDeadlineSeconds", 600)
        == "job ran longer than activeDeadlineSeconds=600"
    )
