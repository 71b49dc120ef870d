"""Kueue's side of a gang's life, without a cluster: a preemption is a disruption, and a gang attempt
that is over gives its Kueue Workload back (Kueue would otherwise hold its quota and its pods)."""

from __future__ import annotations

from typing import Any

from llmop import naming
from llmop.observe import pod_view
from llmop.planner import JobSnapshot, Observed, plan
from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.status import LLMTrainingJobStatus
from tests.unit.test_planner import NOW, pod, running_status


def spec(queue: str | None = "team-a", **scheduling: Any) -> LLMTrainingJobSpec:
    return LLMTrainingJobSpec.model_validate(
        {
            "data": {"prepare": False},
            "training": {"maxSteps": 10, "globalBatchSize": 2, "microBatchSize": 1},
            "workers": {"numNodes": 2, "procsPerNode": 1, "gpusPerNode": 1},
            "scheduling": {"queueName": queue, **scheduling},
            "runPolicy": {"backoffLimit": 0},
        }
    )


def snapshot(s: LLMTrainingJobSpec, status: dict[str, Any]) -> JobSnapshot:
    return JobSnapshot("j", "ns", "uid", 1, s, LLMTrainingJobStatus.model_validate(status))


def preempted_pod(index: int) -> dict[str, Any]:
    """A worker as Kueue leaves it when it preempts the pod group: TerminationTarget, then deleted."""
    return {
        "metadata": {
            "name": f"j-worker-{index}",
            "deletionTimestamp": "2026-11-24T12:00:00Z",
            "labels": {naming.INDEX_LABEL: str(index), naming.ATTEMPT_LABEL: "1"},
        },
        "spec": {"nodeName": f"n{index}", "containers": [{"name": "trainer"}]},
        "status": {
            "phase": "Running",
            "conditions": [
                {
                    "type": naming.KUEUE_TERMINATION_TARGET,
                    "status": "True",
                    "reason": "WorkloadEvicted",
                    "message": "Preempted to accommodate a workload (UID: 1) due to prioritization",
                }
            ],
        },
    }


def test_a_pod_kueue_preempts_is_a_disruption() -> None:
    view = pod_view(preempted_pod(1))
    assert view.disrupted and view.deleting


def test_kueue_preemption_restarts_the_gang_without_counting_a_failure() -> None:
    status = running_status()
    preempted = [pod_view(preempted_pod(0)), pod_view(preempted_pod(1))]
    p = plan(snapshot(spec(), status), Observed(preempted, None, NOW))
    wire = p.status.to_wire()
    # backoffLimit 0: a counted failure would have failed the job.
    assert wire["state"] != "Failed" and wire.get("restartCount", 0) == 0
    assert wire["disruptionCount"] == 1 and wire["attempt"] == 2


def test_the_restarted_gang_gives_back_the_old_attempts_workload() -> None:
    status = {**running_status(), "attempt": 2}
    # Attempt 1's pods are still there (Kueue's finalizer holds them): they go, and so does their
    # Workload, before attempt 2's pod group is created.
    old = [pod(0, attempt=1, deleting=True, disrupted=True), pod(1, attempt=1, deleting=True, disrupted=True)]
    p = plan(snapshot(spec(), status), Observed(old, None, NOW))
    assert p.delete_workloads == [naming.kueue_pod_group("j", 1)]
    assert p.create_workers == []


def test_a_failed_job_gives_back_its_workload() -> None:
    failed = [pod(0), pod(1, phase="Failed", exit_code=1)]
    p = plan(snapshot(spec(), running_status()), Observed(failed, None, NOW))
    assert p.status.to_wire()["state"] == "Failed"
    assert p.delete_workloads == [naming.kueue_pod_group("j", 1)]


def test_without_kueue_there_is_no_workload_to_delete() -> None:
    failed = [pod(0), pod(1, phase="Failed", exit_code=1)]
    for s in (spec(queue=None), spec(gangScheduler="Volcano")):
        p = plan(snapshot(s, running_status()), Observed(failed, None, NOW))
        assert p.status.to_wire()["state"] == "Failed" and p.delete_workloads == []
