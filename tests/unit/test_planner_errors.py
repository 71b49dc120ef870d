"""What a failed reconcile pass leaves on the job: retried with backoff and visible (Synced), or the
job fails with the API's own message when retrying cannot help; and how an error is classified."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from llmop.conditions import get, is_true
from llmop.controller import problem_of
from llmop.kube import ChildConflict, ChildError, Leftover
from llmop.planner import JobSnapshot, Observed, errors
from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.status import LLMTrainingJobStatus

NOW = datetime(2026, 12, 2, 9, 0, 0, tzinfo=UTC)
SPEC = LLMTrainingJobSpec.model_validate(
    {
        "data": {"prepare": False},
        "training": {"maxSteps": 10, "globalBatchSize": 2, "microBatchSize": 1},
        "workers": {"numNodes": 2, "procsPerNode": 1, "gpusPerNode": 1},
    }
)
RUNNING: dict[str, Any] = {
    "state": "Running",
    "attempt": 1,
    "conditions": [
        {"type": "Created", "status": "True", "reason": "JobCreated", "message": "",
         "lastTransitionTime": "2026-12-02T08:00:00Z"},
    ],
}  # fmt: skip


def job(status: dict[str, Any]) -> JobSnapshot:
    return JobSnapshot("j", "ns", "uid-1", 1, SPEC, LLMTrainingJobStatus.model_validate(status))


def api_error(status: int, message: str) -> ApiException:
    e = ApiException(status=status, reason="Reason")
    e.body = f'{{"kind": "Status", "message": "{message}"}}'
    return e


def wire(p: Any) -> dict[str, Any]:
    return dict(p.status.to_wire())


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (
            ChildError.of("creating", "Pod", "j-worker-0", api_error(422, "pods is invalid: bad")),
            "ChildRejected",
        ),
        (ChildError.of("creating", "Pod", "j-worker-0", api_error(400, "bad request")), "ChildRejected"),
        (ChildError.of("creating", "Pod", "j-worker-0", api_error(403, "denied by policy")), "Forbidden"),
        (ChildConflict("ConfigMap", "j-config", "no controller"), "NameConflict"),
    ],
)
def test_errors_retrying_cannot_fix_fail_the_job_with_the_api_message(error: Exception, reason: str) -> None:
    problem = problem_of(error)
    assert problem.kind == errors.ProblemKind.PERMANENT
    p = errors.act_failed(job(RUNNING), Observed(pods=[], prepare=None, now=NOW), problem, 1)
    status = wire(p)
    failed = get(status["conditions"], "Failed")
    assert status["state"] == "Failed" and failed and failed["reason"] == reason
    assert str(error) in failed["message"]  # which child, and what the apiserver said
    assert get(status["conditions"], "Synced")["status"] == "False"  # type: ignore[index]
    assert any(t.type == "Failed" for t in p.transitions)  # one Event says so


@pytest.mark.parametrize(
    "error",
    [
        ChildError.of("creating", "Pod", "j-worker-0", api_error(500, "etcd leader changed")),
        ChildError.of("creating", "Pod", "j-worker-0", api_error(429, "too many requests")),
        ChildError.of("deleting", "Pod", "j-worker-0", api_error(503, "unavailable")),
        ConnectionResetError("connection reset by peer"),
    ],
)
def test_transient_errors_show_on_synced_and_back_off(error: Exception) -> None:
    problem = problem_of(error)
    assert problem.kind == errors.ProblemKind.TRANSIENT and problem.reason == "ApiError"
    delays = []
    for streak in (1, 2, 3, 10):
        p = errors.act_failed(job(RUNNING), Observed(pods=[], prepare=None, now=NOW), problem, streak)
        status = wire(p)
        synced = get(status["conditions"], "Synced")
        assert synced and synced["status"] == "False" and synced["reason"] == "ApiError"
        assert str(error) in synced["message"]
        assert status["state"] == "Running"  # the job itself is not failed
        assert not p.delete_pods and not p.create_workers  # nothing else was decided on a half pass
        delays.append(p.requeue_after)
    assert delays == sorted(delays) and delays[0] == 1.0 and delays[-1] == errors.MAX_BACKOFF_SECONDS


@pytest.mark.parametrize(
    "message",
    [
        'pods \\"j-worker-2\\" is forbidden: exceeded quota: half, requested: pods=1',
        # A quota just created or changed, before its controller counted usage: seconds, not a rule.
        'pods \\"j-worker-2\\" is forbidden: status unknown for quota: half, resources: pods',
    ],
)
def test_a_quota_refusal_is_waited_for_not_failed(message: str) -> None:
    # The apiserver answers 403 for quota too; unlike RBAC's 403 it clears by itself.
    error = ChildError.of("creating", "Pod", "j-worker-2", api_error(403, message))
    assert not error.permanent
    problem = problem_of(error)
    assert problem.kind == errors.ProblemKind.TRANSIENT and problem.reason == "QuotaExceeded"
    p = errors.act_failed(job(RUNNING), Observed(pods=[], prepare=None, now=NOW), problem, 30)
    assert wire(p)["state"] == "Running" and p.requeue_after == errors.QUOTA_RECHECK_SECONDS


def test_a_leftover_is_waited_for_briefly_not_failed() -> None:
    problem = problem_of(Leftover("Pod", "j-worker-0"))
    assert problem.kind == errors.ProblemKind.LEFTOVER
    p = errors.act_failed(job(RUNNING), Observed(pods=[], prepare=None, now=NOW), problem, 5)
    synced = get(wire(p)["conditions"], "Synced")
    assert synced and synced["reason"] == "LeftoverPending" and "j-worker-0" in synced["message"]
    assert p.requeue_after == errors.LEFTOVER_RECHECK_SECONDS


def test_recovery_flips_synced_back_with_an_event_but_a_first_success_posts_none() -> None:
    seen = Observed(pods=[], prepare=None, now=NOW)
    failed = errors.act_failed(job(RUNNING), seen, problem_of(ConnectionResetError("reset")), 1)
    recovered = errors.act_failed(job(RUNNING), seen, problem_of(ConnectionResetError("reset")), 1)
    recovered.transitions.clear()
    errors.reconciled(job(wire(failed)), recovered, seen)
    assert is_true(wire(recovered)["conditions"], "Synced")
    assert [t.reason for t in recovered.transitions] == ["Reconciled"]

    fresh = errors.act_failed(job(RUNNING), seen, problem_of(ConnectionResetError("reset")), 1)
    fresh.status.conditions = [c for c in fresh.status.conditions if c.type != "Synced"]
    fresh.transitions.clear()
    errors.reconciled(job(RUNNING), fresh, seen)
    assert is_true(wire(fresh)["conditions"], "Synced") and not fresh.transitions
