"""Gang-scheduler integrations: Volcano PodGroup and Kueue plain pod groups, on the real apiserver."""

from __future__ import annotations

import json

import pytest

from tests.cluster.conftest import Jobs, OperatorProcess
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster

# The PodGroup CRD as Volcano ships it, reduced to what the apiserver needs to store objects.
VOLCANO_PODGROUP_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "podgroups.scheduling.volcano.sh"},
    "spec": {
        "group": "scheduling.volcano.sh",
        "names": {"kind": "PodGroup", "plural": "podgroups", "singular": "podgroup", "shortNames": ["pg"]},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1beta1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
                "subresources": {"status": {}},
            }
        ],
    },
}


def test_volcano_pod_group(jobs: Jobs, operator: OperatorProcess, cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(VOLCANO_PODGROUP_CRD))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/podgroups.scheduling.volcano.sh", "--timeout=30s"
    )
    jobs.create("vc", scheduling={"gangScheduler": "Volcano", "queueName": "research"})
    group = wait_for(
        lambda: (
            cluster.kubectl(
                "get", "podgroups.scheduling.volcano.sh", "vc-gang", "-n", jobs.ns, "-o", "json", check=False
            ).stdout
        ),
        what="the Volcano PodGroup",
    )
    spec = json.loads(group)["spec"]
    assert (
        spec["minMember"] == 4
        and spec["queue"] == "research"
        and spec["minResources"]["nvidia.com/gpu"] == "8"
    )
    pods = wait_for(lambda: len(p := jobs.pods("vc")) == 4 and p, what="4 workers")
    for pod in pods:
        assert pod["spec"]["schedulerName"] == "volcano"
        assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "vc-gang"
        assert not pod["spec"].get("schedulingGates")


def test_kueue_plain_pod_group_waits_for_admission(jobs: Jobs, operator: OperatorProcess) -> None:
    jobs.create("kq", scheduling={"queueName": "team-a"})
    wait_for(lambda: len(jobs.pods("kq")) == 4, what="4 workers")
    operator.wait_passes(2)  # what the operator keeps doing, not a moment before its next pass
    pods = jobs.pods("kq")
    for pod in pods:
        labels = pod["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
        assert labels["kueue.x-k8s.io/pod-group-name"] == "kq-gang-1"
        assert pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "4"
        # Kueue lifts this gate when it admits the whole group; the operator leaves it alone.
        assert pod["spec"]["schedulingGates"] == [{"name": "kueue.x-k8s.io/admission"}]
        assert not pod["spec"].get("nodeName")
    cond = jobs.wait_condition("kq", "GangScheduled", status="False")
    assert cond["reason"] == "AwaitingAdmission" and "team-a" in cond["message"]
    assert jobs.status("kq")["state"] == "Pending"
