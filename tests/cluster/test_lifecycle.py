"""A job's lifecycle on the real cluster: gang placement, success, failures, restarts, policies."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from llmop.conditions import parse_time
from tests.cluster.conftest import Jobs, OperatorProcess
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster
EXIT_AFTER = "llmop.io/kwok-exit-after"
EXIT_CODE = "llmop.io/kwok-exit-code"


def test_four_node_job_runs_and_succeeds(jobs: Jobs, operator: OperatorProcess, cluster: Cluster) -> None:
    jobs.create("ok")
    # The workers run until told to finish: however slow the machine, Running is there to be seen.
    running = jobs.wait_condition("ok", "Running")
    pods = jobs.pods("ok")
    assert len(pods) == 4
    assert len({p["spec"]["nodeName"] for p in pods}) == 4, "one worker per node"
    for i, pod in enumerate(sorted(pods, key=lambda p: p["metadata"]["name"])):
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["NODE_RANK"] == str(i) and env["NNODES"] == "4" and env["NPROC_PER_NODE"] == "2"
        assert env["MASTER_ADDR"] == f"ok-worker-0.ok-workers.{jobs.ns}.svc"
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "LLMTrainingJob"
        sc = pod["spec"]["containers"][0]["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    jobs.annotate_pods("ok", {EXIT_AFTER: "1s"})
    succeeded = jobs.wait_condition("ok", "Succeeded")
    status = jobs.status("ok")
    assert status["state"] == "Succeeded"
    assert status["restartCount"] == 0 and status["attempt"] == 1
    start, done = parse_time(status["startTime"]), parse_time(status["completionTime"])
    assert (
        start
        <= parse_time(running["lastTransitionTime"])
        <= parse_time(succeeded["lastTransitionTime"])
        == done
    )
    assert jobs.condition("ok", "Running")["status"] == "False"  # type: ignore[index]
    reasons = {e["reason"] for e in jobs.events("ok")}
    assert {"JobCreated", "AllWorkersRunning", "TrainingSucceeded"} <= reasons
    out = cluster.kubectl(
        "wait", "--for=condition=Succeeded", "llmtrainingjob/ok", "-n", jobs.ns, "--timeout=5s"
    )
    assert "condition met" in out.stdout


def test_retryable_failure_restarts_whole_gang(jobs: Jobs, operator: OperatorProcess) -> None:
    jobs.create("retry")
    first = jobs.wait_pods("retry", 4, attempt=1)
    first_uids = {p["metadata"]["uid"] for p in first}
    jobs.annotate_pods("retry", {EXIT_AFTER: "1s", EXIT_CODE: "1"}, only=["retry-worker-2"])
    second = jobs.wait_pods("retry", 4, attempt=2)
    assert first_uids.isdisjoint({p["metadata"]["uid"] for p in second}), "every worker was recreated"
    status = jobs.status("retry")
    assert status["restartCount"] == 1 and status["attempt"] == 2
    jobs.annotate_pods("retry", {EXIT_AFTER: "1s"})
    jobs.wait_condition("retry", "Succeeded")
    assert jobs.status("retry")["restartCount"] == 1
    assert any(e["reason"] == "WorkerFailed" and e["type"] == "Warning" for e in jobs.events("retry"))


def test_permanent_failure_fails_the_job(jobs: Jobs, operator: OperatorProcess) -> None:
    jobs.create(
        "perm",
        runPolicy={"restartPolicy": "ExitCode", "exitCodeRules": [{"action": "Fail", "exitCodes": [2]}]},
    )
    jobs.wait_pods("perm", 4)
    jobs.annotate_pods("perm", {EXIT_AFTER: "1s", EXIT_CODE: "2"}, only=["perm-worker-1"])
    failed = jobs.wait_condition("perm", "Failed")
    assert failed["reason"] == "PermanentFailure" and "exit code 2" in failed["message"]
    assert jobs.status("perm")["restartCount"] == 0
    wait_for(
        lambda: (
            all(
                p["status"]["phase"] != "Running" or p["metadata"].get("deletionTimestamp")
                for p in jobs.pods("perm")
            )
            or not jobs.pods("perm")
        ),
        what="running workers of the failed job to be deleted",
    )


def test_backoff_limit_exhausted(jobs: Jobs, operator: OperatorProcess) -> None:
    jobs.create(
        "backoff",
        runPolicy={"backoffLimit": 1},
        workers={"podAnnotations": {EXIT_AFTER: "1s", EXIT_CODE: "1"}},
    )
    failed = jobs.wait_condition("backoff", "Failed", timeout=90)
    assert failed["reason"] == "BackoffLimitExceeded"
    status = jobs.status("backoff")
    assert status["restartCount"] == 1 and status["attempt"] == 2


def test_eviction_does_not_count_against_backoff(jobs: Jobs, operator: OperatorProcess) -> None:
    jobs.create("evict", runPolicy={"backoffLimit": 0})
    jobs.wait_pods("evict", 4, attempt=1)
    jobs.annotate_pods("evict", {"llmop.io/kwok-evict-after": "1s"}, only=["evict-worker-3"])
    jobs.wait_pods("evict", 4, attempt=2)
    status = jobs.status("evict")
    assert status["restartCount"] == 0 and status["disruptionCount"] == 1
    assert jobs.condition("evict", "Failed") is None
    jobs.wait_condition("evict", "Running")


def test_active_deadline(jobs: Jobs, operator: OperatorProcess) -> None:
    # An hour, so the gang is seen Running however loaded the machine; then the deadline is moved
    # to a few seconds from now (the planner's unit tests check the arithmetic on their own clock).
    jobs.create("deadline", runPolicy={"activeDeadlineSeconds": 3600})
    jobs.wait_pods("deadline", 4)
    jobs.wait_condition("deadline", "Running")
    start = parse_time(jobs.status("deadline")["startTime"])
    limit = math.ceil((datetime.now(UTC) - start).total_seconds()) + 3
    jobs.patch_spec("deadline", {"runPolicy": {"activeDeadlineSeconds": limit}})
    failed = jobs.wait_condition("deadline", "Failed", timeout=60)
    assert failed["reason"] == "DeadlineExceeded" and f"activeDeadlineSeconds={limit}" in failed["message"]
    # Not before the deadline (both times are the operator's, on this machine's clock).
    assert parse_time(failed["lastTransitionTime"]) >= start + timedelta(seconds=limit)
    wait_for(
        lambda: not [p for p in jobs.pods("deadline") if not p["metadata"].get("deletionTimestamp")],
        what="pods deleted",
    )


def test_suspend_and_resume(jobs: Jobs, operator: OperatorProcess, cluster: Cluster) -> None:
    jobs.create("sus")
    jobs.wait_pods("sus", 4, attempt=1)
    jobs.patch_spec("sus", {"runPolicy": {"suspend": True}})
    jobs.wait_condition("sus", "Suspended")
    # The edit was taken up, and says so: observedGeneration follows, an Event names the generation.
    job = jobs.get("sus")
    generation = job["metadata"]["generation"]
    assert generation >= 2 and job["status"]["observedGeneration"] == generation
    wait_for(
        lambda: any(
            e["reason"] == "SpecUpdated" and f"generation {generation}" in e["message"]
            for e in jobs.events("sus")
        ),
        what="the SpecUpdated Event",
    )
    wait_for(lambda: not jobs.pods("sus"), what="pods deleted while suspended")
    assert jobs.status("sus")["state"] == "Suspended"
    jobs.patch_spec("sus", {"runPolicy": {"suspend": False}})
    jobs.wait_pods("sus", 4, attempt=2)
    jobs.wait_condition("sus", "Running")
    status = jobs.status("sus")
    assert jobs.condition("sus", "Suspended")["status"] == "False"  # type: ignore[index]
    assert status["restartCount"] == 0


def test_ttl_deletes_finished_job(jobs: Jobs, operator: OperatorProcess, cluster: Cluster) -> None:
    # An hour, so the finished job is seen however loaded the machine; then the TTL is moved to
    # end a few seconds from now.
    jobs.create(
        "ttl", runPolicy={"ttlSecondsAfterFinished": 3600}, workers={"podAnnotations": {EXIT_AFTER: "1s"}}
    )
    jobs.wait_condition("ttl", "Succeeded")
    done = parse_time(jobs.status("ttl")["completionTime"])
    ttl = math.ceil((datetime.now(UTC) - done).total_seconds()) + 3
    jobs.patch_spec("ttl", {"runPolicy": {"ttlSecondsAfterFinished": ttl}})
    expires = done + timedelta(seconds=ttl)

    def deleted() -> bool:
        gone = (
            "NotFound" in cluster.kubectl("get", "llmtrainingjob", "ttl", "-n", jobs.ns, check=False).stderr
        )
        # The operator deletes once its clock (this machine's) passes completionTime + TTL.
        assert not gone or datetime.now(UTC) >= expires, f"deleted before its TTL ran out at {expires}"
        return gone

    wait_for(deleted, timeout=60, interval=0.2, what="the job to be deleted by its TTL")


def test_delete_removes_every_child(jobs: Jobs, operator: OperatorProcess, cluster: Cluster) -> None:
    jobs.create("gone", data={"prepare": True, "sources": [{"uri": "builtin://english"}]})
    jobs.wait_pods("gone", 4)
    kinds = "pods,services,configmaps,persistentvolumeclaims,serviceaccounts,jobs.batch"
    selector = "llmop.io/job-name=gone"
    assert len(cluster.kubectl_json("get", kinds, "-n", jobs.ns, "-l", selector)["items"]) >= 4 + 5
    cluster.kubectl("delete", "llmtrainingjob", "gone", "-n", jobs.ns, "--wait=true", "--timeout=60s")
    wait_for(
        lambda: (
            not [
                o
                for o in cluster.kubectl_json("get", kinds, "-n", jobs.ns, "-l", selector)["items"]
                if o["kind"] != "Pod" or not o["metadata"].get("deletionTimestamp")
            ]
        ),
        timeout=60,
        what="every child of the deleted job to be gone",
    )


def test_gang_too_large_waits_unplaced(jobs: Jobs, operator: OperatorProcess) -> None:
    jobs.create(
        "huge", workers={"numNodes": 5, "procsPerNode": 8, "gpusPerNode": 8}, training={"globalBatchSize": 40}
    )
    cond = jobs.wait_condition("huge", "GangScheduled", status="False")
    assert cond["reason"] == "InsufficientCapacity"
    assert "needs 5 nodes with 8 free nvidia.com/gpu" in cond["message"]
    operator.wait_passes(3)  # capacity is checked again every 2 s: it still waits after that
    pods = jobs.pods("huge")
    assert len(pods) == 5
    assert all(p["spec"].get("schedulingGates") for p in pods), "the gang's gate stays on every worker"
    assert not any(p["spec"].get("nodeName") for p in pods), (
        "no worker may be bound while the gang cannot fit"
    )
    assert jobs.status("huge")["state"] == "Pending"
