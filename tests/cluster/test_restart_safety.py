"""The operator can be killed at any point; after a restart it converges without duplicates.

Each kill lands in the state it is named after because the test holds the cluster there first (a
pod quota, a finalizer, an operator that is down), and checks that state at the kill: a kill that
merely raced the operator could land after the interesting moment and prove nothing.
"""

from __future__ import annotations

import pytest

from tests.cluster.conftest import Jobs, OperatorProcess
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster
EXIT_AFTER = "llmop.io/kwok-exit-after"
EXIT_CODE = "llmop.io/kwok-exit-code"


def _one_gang(jobs: Jobs, name: str, attempt: int) -> None:
    pods = jobs.wait_pods(name, 4, attempt=attempt)
    assert sorted(p["metadata"]["name"] for p in pods) == [f"{name}-worker-{i}" for i in range(4)]
    # No pod of any other attempt survives next to the gang.
    wait_for(lambda: len(jobs.pods(name)) == 4, what="only one gang")


def test_job_created_while_operator_down(jobs: Jobs, operator: OperatorProcess) -> None:
    operator.kill()
    jobs.create("early")
    assert jobs.status("early") == {} and jobs.pods("early") == []
    operator.start()
    _one_gang(jobs, "early", attempt=1)
    jobs.wait_condition("early", "Running")
    assert jobs.status("early")["restartCount"] == 0


def test_failure_while_operator_down_counted_once(jobs: Jobs, operator: OperatorProcess) -> None:
    jobs.create("down")
    jobs.wait_pods("down", 4, attempt=1)
    jobs.wait_condition("down", "Running")
    operator.kill()
    jobs.annotate_pods("down", {EXIT_AFTER: "1s", EXIT_CODE: "1"}, only=["down-worker-0"])
    wait_for(lambda: any(p["status"]["phase"] == "Failed" for p in jobs.pods("down")), what="worker failure")
    # What the next operator starts from: a running job in status, a failed worker in the cluster.
    before = jobs.status("down")
    assert (before["state"], before["attempt"], before["restartCount"]) == ("Running", 1, 0)
    operator.start()
    _one_gang(jobs, "down", attempt=2)
    jobs.wait_condition("down", "Running")
    status = jobs.status("down")
    assert status["restartCount"] == 1 and status["attempt"] == 2


def test_killed_mid_restart_converges(jobs: Jobs, operator: OperatorProcess) -> None:
    jobs.create("mid")
    old = jobs.wait_pods("mid", 4, attempt=1)
    # The old gang cannot finish terminating while held: the restart stops between deleting the
    # old gang and creating the new one, and the kill lands there.
    jobs.hold_pods([p["metadata"]["name"] for p in old])
    try:
        jobs.annotate_pods("mid", {EXIT_AFTER: "1s", EXIT_CODE: "1"}, only=["mid-worker-1"])

        def mid_restart() -> bool:
            pods = jobs.pods("mid")
            return (
                jobs.status("mid").get("attempt") == 2
                and len(pods) == 4
                and all(p["metadata"].get("deletionTimestamp") for p in pods)
                and all(p["metadata"]["labels"]["llmop.io/attempt"] == "1" for p in pods)
            )

        wait_for(mid_restart, timeout=60, what="attempt 2 recorded, old gang terminating, no new gang")
        operator.kill()
        status = jobs.status("mid")
        assert (status["state"], status["attempt"], status["restartCount"]) == ("Restarting", 2, 1)
        operator.start()
        # The new operator sees the same half-done restart for a few passes: it neither counts the
        # failure again nor starts the new gang beside the terminating old one.
        operator.wait_passes(2)
        assert mid_restart(), jobs.pods("mid")
        assert jobs.status("mid")["restartCount"] == 1
    finally:
        jobs.release_pods()
    _one_gang(jobs, "mid", attempt=2)
    jobs.wait_condition("mid", "Running")
    status = jobs.status("mid")
    assert status["restartCount"] == 1 and status["attempt"] == 2


def test_killed_with_half_the_gang_created(jobs: Jobs, operator: OperatorProcess, cluster: Cluster) -> None:
    # A quota of 2 pods: the operator creates the whole gang at once and 2 of the 4 creates are
    # refused, so the kill lands with part of the gang created and the rest not.
    cluster.set_quota(jobs.ns, "half", {"pods": "2"})
    logged = len(operator.full_log())
    jobs.create("fresh")
    wait_for(
        lambda: len(jobs.pods("fresh")) == 2 and "exceeded quota" in operator.full_log()[logged:],
        what="2 workers created and the other creates refused",
    )
    operator.kill()
    created = jobs.pods("fresh")
    assert len(created) == 2 and all(p["spec"].get("schedulingGates") for p in created), (
        "half a gang is never released to the scheduler"
    )
    cluster.kubectl("delete", "resourcequota", "half", "-n", jobs.ns)
    operator.start()
    _one_gang(jobs, "fresh", attempt=1)
    survivors = {p["metadata"]["uid"] for p in created}
    assert survivors <= {p["metadata"]["uid"] for p in jobs.pods("fresh")}, "the created half was kept"
    jobs.wait_condition("fresh", "Running")
    status = jobs.status("fresh")
    assert status["restartCount"] == 0 and status["disruptionCount"] == 0 and status["attempt"] == 1
