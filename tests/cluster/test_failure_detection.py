"""Failure detection on the real cluster: a worker's node deleted or NotReady, or a worker evicted,
restarts the gang within seconds, from the watch events, not once the pods are garbage-collected
(the pod garbage collector removes pods of a deleted node only after 40 s).

Each test breaks one of the 4 fake nodes under a running 2-worker gang and restores it afterwards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from llmop_dev import cluster as devcluster
from tests.cluster.conftest import Jobs, OperatorProcess
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster
DETECTED_WITHIN = 10.0  # seconds from the failure to the job restarting


@pytest.fixture
def broken_nodes(cluster: Cluster) -> Iterator[list[str]]:
    """Names of the fake nodes a test breaks; each is made anew (Ready, managed by kwok) afterwards."""
    broken: list[str] = []
    yield broken
    fakes = {n.name: n for n in devcluster.default_nodes()}
    for name in broken:
        cluster.kubectl("delete", "node", name, "--ignore-not-found", "--wait=true")
        cluster.kubectl("create", "-f", "-", input=json.dumps(fakes[name].manifest()))

    def ready() -> bool:
        items = cluster.kubectl_json("get", "nodes")["items"]
        return all(
            any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
            for n in items
            if n["metadata"]["name"] in broken
        )

    wait_for(ready, timeout=60, what=f"nodes {broken} Ready again")


def running_gang(jobs: Jobs, name: str) -> dict[str, Any]:
    """A running 2-worker gang; returns worker 1's pod."""
    jobs.create(name, workers={"numNodes": 2})
    pods = jobs.wait_pods(name, 2, attempt=1)
    jobs.wait_condition(name, "Running")
    return next(p for p in pods if p["metadata"]["labels"]["llmop.io/worker-index"] == "1")


def wait_restarted(jobs: Jobs, name: str) -> float:
    """Seconds until the job records attempt 2 (it left Running and restarts the whole gang)."""
    started = time.monotonic()
    wait_for(
        lambda: jobs.status(name).get("attempt") == 2,
        timeout=DETECTED_WITHIN,
        interval=0.2,
        what=f"{name} restarting within {DETECTED_WITHIN} s",
    )
    return time.monotonic() - started


def restart_event(jobs: Jobs, name: str, reason: str) -> str:
    def find() -> str | None:
        return next(
            (e["message"] for e in jobs.events(name) if e["reason"] == reason and e["type"] == "Warning"),
            None,
        )

    return str(wait_for(find, timeout=10, what=f"a {reason} Warning event on {name}"))


def recovered_elsewhere(jobs: Jobs, name: str, dead_node: str) -> None:
    """The new gang runs on other nodes, alone; the loss was a disruption, not a failure."""
    pods = jobs.wait_pods(name, 2, attempt=2, timeout=60)
    assert dead_node not in {p["spec"]["nodeName"] for p in pods}
    wait_for(lambda: len(jobs.pods(name)) == 2, what="no pod of the old gang left")
    jobs.wait_condition(name, "Running")
    status = jobs.status(name)
    assert (status["attempt"], status["restartCount"], status["disruptionCount"]) == (2, 0, 1)
    assert jobs.condition(name, "Failed") is None


def test_deleted_node_restarts_gang_within_seconds(
    jobs: Jobs, operator: OperatorProcess, cluster: Cluster, broken_nodes: list[str]
) -> None:
    victim = running_gang(jobs, "gone")
    node = victim["spec"]["nodeName"]
    broken_nodes.append(node)
    cluster.kubectl("delete", "node", node, "--wait=false")
    wait_restarted(jobs, "gone")
    message = restart_event(jobs, "gone", "NodeLost")
    assert f"node {node} of worker 1 was deleted" in message
    # The worker's pod is force-deleted: nothing would ever confirm its termination on a gone node.
    recovered_elsewhere(jobs, "gone", node)


def test_not_ready_node_restarts_gang_within_seconds(
    jobs: Jobs, operator: OperatorProcess, cluster: Cluster, broken_nodes: list[str]
) -> None:
    victim = running_gang(jobs, "sick")
    node = victim["spec"]["nodeName"]
    broken_nodes.append(node)
    # kwok sets every node it manages back to Ready at once (its node-initialize Stage); without its
    # annotation it no longer sees the node's updates, so the patched status stays (until at most
    # one heartbeat kwok had already scheduled, 20-45 s later: the restart is long done by then).
    # Cordoned as well, so the new gang is not scheduled onto it before the node lifecycle
    # controller would taint it.
    let_go = {"metadata": {"annotations": {"kwok.x-k8s.io/node": None}}, "spec": {"unschedulable": True}}
    cluster.kubectl("patch", "node", node, "--type=merge", "-p", json.dumps(let_go))
    not_ready = {
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "Unknown",
                    "reason": "NodeStatusUnknown",
                    "message": "Kubelet stopped posting node status.",
                }
            ]
        }
    }
    cluster.kubectl("patch", "node", node, "--subresource=status", "-p", json.dumps(not_ready))
    wait_restarted(jobs, "sick")
    assert f"node {node} of worker 1 is NotReady (Ready=Unknown)" in restart_event(jobs, "sick", "NodeLost")
    recovered_elsewhere(jobs, "sick", node)


def test_evicted_worker_restarts_gang_before_it_is_gone(
    jobs: Jobs, operator: OperatorProcess, cluster: Cluster
) -> None:
    victim = running_gang(jobs, "evicted")
    name = victim["metadata"]["name"]
    # Held Terminating (a test finalizer), like a worker writing its checkpoint in its grace period:
    # the gang restarts on the eviction itself, not once the pod is gone.
    jobs.hold_pods([name])
    try:
        eviction = client.V1Eviction(metadata=client.V1ObjectMeta(name=name, namespace=jobs.ns))
        client.CoreV1Api(cluster.api()).create_namespaced_pod_eviction(name, jobs.ns, eviction)
        wait_restarted(jobs, "evicted")
        assert f"worker {name} is being evicted" in restart_event(jobs, "evicted", "WorkerDisrupted")
        assert name in {p["metadata"]["name"] for p in jobs.pods("evicted")}, "still held Terminating"
        attempts = {p["metadata"]["labels"]["llmop.io/attempt"] for p in jobs.pods("evicted")}
        assert attempts == {"1"}, "never two gangs at once"
    finally:
        jobs.release_pods()
    jobs.wait_pods("evicted", 2, attempt=2, timeout=60)
    jobs.wait_condition("evicted", "Running")
    status = jobs.status("evicted")
    assert (status["attempt"], status["restartCount"], status["disruptionCount"]) == (2, 0, 1)
