"""Failure detection without a cluster: a worker whose node is gone or NotReady is lost at once, and
pods no kubelet will ever confirm are deleted with grace 0; plus the node health and its index."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from llmop import nodewatch
from llmop.capacity import NodeView
from llmop.conditions import get, is_true
from llmop.planner import Observed
from tests.unit.test_planner import NOW, plan, pod, running_status, snapshot, spec


def lost(**nodes: str) -> Observed:
    """The running 2-worker gang (workers on n0 and n1) with these nodes lost."""
    return Observed([pod(0), pod(1)], None, NOW, lost_nodes=nodes)


def test_worker_on_deleted_node_restarts_gang_as_disruption() -> None:
    p = plan(snapshot(spec(backoffLimit=0), running_status()), lost(n1="was deleted"))
    assert p.status["state"] == "Restarting" and p.status["attempt"] == 2
    assert p.status["restartCount"] == 0 and p.status["disruptionCount"] == 1
    restarting = get(p.status["conditions"], "Restarting")
    assert restarting is not None and restarting["reason"] == "NodeLost"
    assert restarting["message"].startswith("node n1 of worker 1 was deleted; restarting the whole gang")
    assert not is_true(p.status["conditions"], "Running") and not is_true(p.status["conditions"], "Failed")
    # The pod on the dead node can never be confirmed gone: grace 0; its peer terminates gracefully.
    assert p.force_delete_pods == ["j-worker-1"] and p.delete_pods == ["j-worker-0"]


def test_not_ready_node_names_its_state() -> None:
    p = plan(snapshot(spec(), running_status()), lost(n0="is NotReady (Ready=Unknown)"))
    message = get(p.status["conditions"], "Running")["message"]  # type: ignore[index]
    assert message == "node n0 of worker 0 is NotReady (Ready=Unknown)"
    assert p.force_delete_pods == ["j-worker-0"] and p.delete_pods == ["j-worker-1"]


def test_node_loss_outranks_the_peers_failure_it_caused() -> None:
    # Worker 0 crashed in a collective because worker 1's node died: one disruption, not a failure.
    seen = Observed(
        [pod(0, phase="Failed", exit_code=1), pod(1)], None, NOW, lost_nodes={"n1": "was deleted"}
    )
    p = plan(snapshot(spec(backoffLimit=0), running_status()), seen)
    assert p.status["restartCount"] == 0 and p.status["disruptionCount"] == 1
    assert get(p.status["conditions"], "Restarting")["reason"] == "NodeLost"  # type: ignore[index]


def test_finished_worker_on_lost_node_is_not_lost() -> None:
    seen = Observed([pod(0), pod(1, phase="Succeeded")], None, NOW, lost_nodes={"n1": "was deleted"})
    p = plan(snapshot(spec(), running_status()), seen)
    assert p.status["attempt"] == 1 and p.status["disruptionCount"] == 0


def test_stale_pod_on_lost_node_is_force_deleted_even_while_terminating() -> None:
    # Attempt 2 waits for attempt 1's pods; one is stuck Terminating on a deleted node.
    status = {**running_status(), "attempt": 2, "state": "Restarting"}
    stuck = pod(1, attempt=1, deleting=True)
    seen = Observed([pod(0, attempt=1), stuck], None, NOW, lost_nodes={"n1": "was deleted"})
    p = plan(snapshot(spec(), status), seen)
    assert p.force_delete_pods == ["j-worker-1"] and p.delete_pods == ["j-worker-0"]
    assert p.create_workers == [] and p.status["attempt"] == 2, "never two gangs at once"
    # Without the node loss the Terminating pod is only waited for.
    p = plan(snapshot(spec(), status), Observed([stuck], None, NOW))
    assert p.force_delete_pods == [] and p.delete_pods == [] and p.create_workers == []


def test_evicted_worker_restarts_gang_before_it_is_gone() -> None:
    evicted = pod(1, deleting=True, disrupted=True)
    p = plan(snapshot(spec(backoffLimit=0), running_status()), Observed([pod(0), evicted], None, NOW))
    assert p.status["attempt"] == 2 and p.status["restartCount"] == 0 and p.status["disruptionCount"] == 1
    restarting = get(p.status["conditions"], "Restarting")
    assert restarting is not None and restarting["reason"] == "WorkerDisrupted"
    assert "j-worker-1 is being evicted" in restarting["message"]
    assert p.delete_pods == ["j-worker-0"], "the evicted one is already terminating"


def test_failing_job_force_deletes_pods_on_lost_nodes() -> None:
    # The deadline passes while worker 0's node is NotReady: the job fails, and that pod goes at once.
    later = NOW + timedelta(seconds=10)
    seen = Observed([pod(0), pod(1)], None, later, lost_nodes={"n0": "is NotReady (Ready=False)"})
    p = plan(snapshot(spec(activeDeadlineSeconds=5), running_status()), seen)
    assert p.status["state"] == "Failed"
    assert p.force_delete_pods == ["j-worker-0"] and p.delete_pods == ["j-worker-1"]


def node(ready: str | None = "True", taints: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": ready}] if ready is not None else []
    return {
        "metadata": {"name": "n"},
        "spec": {"taints": taints or []},
        "status": {"conditions": conditions, "allocatable": {"nvidia.com/gpu": "8"}},
    }


@pytest.mark.parametrize(
    ("body", "trouble"),
    [
        (node("True"), None),
        (node(None), None),  # registering: no condition yet
        (node("False"), "is NotReady (Ready=False)"),
        (node("Unknown"), "is NotReady (Ready=Unknown)"),
        (
            node("True", [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]),
            "is unreachable (taint node.kubernetes.io/unreachable)",
        ),
        (
            node("True", [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]),
            "is not-ready (taint node.kubernetes.io/not-ready)",
        ),
        (node("True", [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]), None),
    ],
)
def test_node_trouble(body: dict[str, Any], trouble: str | None) -> None:
    view = NodeView.from_node(body)
    assert view.trouble() == trouble
    assert view.ready == (body["status"]["conditions"] == [{"type": "Ready", "status": "True"}])


def test_lost_nodes_from_the_index() -> None:
    index = {"n0": [""], "n1": ["is NotReady (Ready=Unknown)"]}
    pods = [pod(0), pod(1), pod(2, node="gone"), pod(3, node=None)]
    nodewatch._deleted["gone"] = 0.0
    try:
        assert nodewatch.lost_nodes(index, pods, now=1.0) == {
            "n1": "is NotReady (Ready=Unknown)",
            "gone": "was deleted",
        }
    finally:
        nodewatch._deleted.pop("gone")


def test_node_missing_without_deletion_counts_only_after_grace() -> None:
    # A pod can name a node added a moment ago before the node's own event arrives.
    pods = [pod(0, node="new")]
    try:
        assert nodewatch.lost_nodes({}, pods, now=100.0) == {}
        assert nodewatch.lost_nodes({}, pods, now=100.0 + nodewatch.MISSING_GRACE_SECONDS) == {
            "new": "is not found"
        }
        assert nodewatch.lost_nodes({"new": [""]}, pods, now=200.0) == {}, "it showed up after all"
        assert "new" not in nodewatch._missing
    finally:
        nodewatch._missing.pop("new", None)
