"""The operator can be killed at any point; after a restart it converges without duplicates."""

from __future__ import annotations

import pytest

from tests.kube import wait_for
from tests.operator.conftest import Jobs, OperatorProcess

pytestmark = pytest.mark.cluster


def _one_gang(jobs: Jobs, name: str, attempt: int) -> None:
    pods = jobs.wait_pods(name, 4, attempt=attempt)
    assert sorted(p["metadata"]["name"] for p in pods) == [f"{name}-worker-{i}" for i in range(4)]
    # No pod of any other attempt survives next to the gang.
    wait_for(lambda: len(jobs.pods(name)) == 4, what="only one gang")


def test_job_created_while_operator_down(jobs: Jobs, operator: OperatorProcess) -> None:
    operator.kill()
    jobs.create("early")
    operator.start()
    _one_gang(jobs, "early", attempt=1)
    jobs.wait_condition("early", "Running")
    assert jobs.status("early")["restartCount"] == 0


def test_failure_while_operator_down_counted_once(jobs: Jobs, operator: OperatorProcess) -> None:
    jobs.create("down")
    jobs.wait_pods("down", 4, attempt=1)
    jobs.wait_condition("down", "Running")
    operator.kill()
    jobs.annotate_pods(
        "down", {"llmop.io/kwok-exit-after": "1s", "llmop.io/kwok-exit-code": "1"}, only=["down-worker-0"]
    )
    wait_for(lambda: any(p["status"]["phase"] == "Failed" for p in jobs.pods("down")), what="worker failure")
    operator.start()
    _one_gang(jobs, "down", attempt=2)
    jobs.wait_condition("down", "Running")
    status = jobs.status("down")
    assert status["restartCount"] == 1 and status["attempt"] == 2


def test_killed_mid_restart_converges(jobs: Jobs, operator: OperatorProcess) -> None:
    jobs.create("mid")
    jobs.wait_pods("mid", 4, attempt=1)
    jobs.annotate_pods(
        "mid", {"llmop.io/kwok-exit-after": "1s", "llmop.io/kwok-exit-code": "1"}, only=["mid-worker-1"]
    )
    # Kill as soon as the restart is decided (the new attempt is recorded before the old gang is
    # deleted): the old gang is deleting and the new one not yet fully created.
    wait_for(
        lambda: jobs.status("mid").get("attempt") == 2, interval=0.05, timeout=30, what="attempt 2 recorded"
    )
    operator.kill()
    operator.start()
    _one_gang(jobs, "mid", attempt=2)
    jobs.wait_condition("mid", "Running")
    status = jobs.status("mid")
    assert status["restartCount"] == 1 and status["attempt"] == 2


def test_killed_right_after_gang_creation(jobs: Jobs, operator: OperatorProcess) -> None:
    jobs.create("fresh")
    wait_for(lambda: len(jobs.pods("fresh")) >= 1, interval=0.05, what="first worker created")
    operator.kill()
    operator.start()
    _one_gang(jobs, "fresh", attempt=1)
    jobs.wait_condition("fresh", "Running")
    assert jobs.status("fresh")["restartCount"] == 0
