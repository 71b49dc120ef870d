"""An elastic gang on the real cluster: a node lost with no replacement shrinks the gang after the
grace period, capacity back grows it again, and each resize is in status, in an Event and in the
printer column.

The job's workers may run only on nodes labelled for this test (two at first, 8 fake GPUs each, a
whole node per worker), so what fits is exactly what the test makes or deletes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from llmop_dev import cluster as devcluster
from tests.cluster.conftest import Jobs, OperatorProcess
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster

LABEL = "test.llmop.io/elastic-node"
EXIT_AFTER, EXIT_CODE = "llmop.io/kwok-exit-after", "llmop.io/kwok-exit-code"
GRACE = 3


@pytest.fixture
def pool(cluster: Cluster, namespace: str) -> Iterator[list[str]]:
    made: list[str] = []

    def add() -> str:
        node = devcluster.FakeNode(
            name=f"elastic-{namespace}-{len(made)}", ip=f"127.0.3.{len(made) + 1}", labels={LABEL: namespace}
        )
        cluster.kubectl("create", "-f", "-", input=json.dumps(node.manifest()))
        made.append(node.name)
        return node.name

    add(), add()
    yield made
    cluster.kubectl("delete", "nodes", "-l", f"{LABEL}={namespace}", "--wait=false", check=False)


def running(jobs: Jobs, name: str, nodes: int, attempt: int) -> list[dict[str, Any]]:
    pods = jobs.wait_pods(name, nodes, attempt=attempt, timeout=90)
    wait_for(
        lambda: jobs.status(name).get("state") == "Running" and jobs.status(name).get("attempt") == attempt,
        timeout=60,
        what=f"{name} Running as attempt {attempt}",
    )
    return pods


def nnodes(pod: dict[str, Any]) -> str:
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    return str(env["NNODES"])


def test_an_elastic_gang_shrinks_on_node_loss_and_grows_back(
    cluster: Cluster, namespace: str, jobs: Jobs, operator: OperatorProcess, pool: list[str]
) -> None:
    jobs.create(
        "elastic",
        training={"globalBatchSize": 16},
        workers={
            "numNodes": 2, "minNodes": 1, "procsPerNode": 8, "gpusPerNode": 8,
            "resizeGraceSeconds": GRACE, "nodeSelector": {LABEL: namespace},
        },
    )  # fmt: skip
    pods = running(jobs, "elastic", 2, attempt=1)
    assert jobs.status("elastic")["currentNodes"] == 2 and {nnodes(p) for p in pods} == {"2"}

    # A node goes and nothing replaces it: the gang restarts (NodeLost), cannot be whole, and after
    # the grace period runs on the one node left.
    victim = next(p for p in pods if p["metadata"]["labels"]["llmop.io/worker-index"] == "1")
    cluster.kubectl("delete", "node", victim["spec"]["nodeName"], "--wait=false")
    [alone] = running(jobs, "elastic", 1, attempt=3)
    status = jobs.status("elastic")
    assert status["currentNodes"] == 1 and nnodes(alone) == "1"
    assert (status["restartCount"], status["disruptionCount"]) == (0, 1)  # the loss, not the resize
    shrunk = status["resizes"][0]
    assert (shrunk["fromNodes"], shrunk["toNodes"], shrunk["attempt"], shrunk["reason"]) == (
        2,
        1,
        3,
        "GangShrunk",
    )
    table = cluster.kubectl("get", "llmtrainingjob", "elastic", "-n", namespace).stdout
    header, row = table.splitlines()[:2]
    assert row.split()[header.split().index("NODES")] == "1"

    # Capacity returns: after the grace period the gang grows back to its preferred size.
    name = f"elastic-{namespace}-2"
    node = devcluster.FakeNode(name=name, ip="127.0.3.3", labels={LABEL: namespace})
    cluster.kubectl("create", "-f", "-", input=json.dumps(node.manifest()))
    pods = running(jobs, "elastic", 2, attempt=4)
    status = jobs.status("elastic")
    assert status["currentNodes"] == 2 and {nnodes(p) for p in pods} == {"2"}
    grown = status["resizes"][1]
    assert (grown["fromNodes"], grown["toNodes"], grown["attempt"], grown["reason"]) == (1, 2, 4, "GangGrown")
    reasons = [e["reason"] for e in jobs.events("elastic")]
    assert reasons.count("GangShrunk") == 1 and reasons.count("GangGrown") == 1 and "NodeLost" in reasons

    jobs.annotate_pods("elastic", {EXIT_AFTER: "0s", EXIT_CODE: "0"})
    jobs.wait_condition("elastic", "Succeeded", timeout=60)
    status = jobs.status("elastic")
    assert status["attempt"] == 4 and len(status["resizes"]) == 2
    print(f"\n{table}", *(json.dumps(r) for r in status["resizes"]), sep="\n")
    print(*(f"{e['type']} {e['reason']}: {e['message']}" for e in jobs.events("elastic")), sep="\n")
