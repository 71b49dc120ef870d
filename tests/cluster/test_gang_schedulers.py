"""Gang-scheduler integrations on the real apiserver: the Volcano and coscheduling PodGroups under
each project's released CRD schema (tests/cluster/crds/), and Kueue plain pod groups.

No Volcano or coscheduling scheduler runs here (neither is served as a Go module: docs/scheduling.md),
so what is proven is that the apiserver accepts the operator's PodGroups under the real structural
schemas and stores every field the operator set, unpruned; the gang placement itself is not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmop.builders import JobRef, scheduling
from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec
from tests.cluster import crds
from tests.cluster.conftest import Jobs, OperatorProcess
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster

PRIORITY_CLASS = "llmop-test-gang-high"


def install_crd(cluster: Cluster, path: Path) -> str:
    """The vendored CRD, as released, replacing whatever an earlier run left under its name."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    name = crds.crd_name(path)
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    # The schema the apiserver serves is the released one, not a stub that keeps anything.
    served = cluster.kubectl_json("get", "crd", name)["spec"]["versions"]
    released = crds.load(path)["spec"]["versions"]
    assert [v["schema"] for v in served] == [v["schema"] for v in released]
    return name


@pytest.fixture
def priority_class(cluster: Cluster) -> Iterator[str]:
    manifest = {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {"name": PRIORITY_CLASS},
        "value": 1000,
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    yield PRIORITY_CLASS


def expected_pod_group(jobs: Jobs, name: str, api_version: str) -> dict[str, Any]:
    """What the operator's builder makes for the job as the apiserver stored it (defaults included)."""
    job = jobs.get(name)
    ref = JobRef(name, jobs.ns, job["metadata"]["uid"], LLMTrainingJobSpec.model_validate(job["spec"]))
    group = scheduling.build_pod_group(ref)
    assert group is not None and group["apiVersion"] == api_version
    return group


def stored_pod_group(cluster: Cluster, resource: str, ns: str, name: str) -> dict[str, Any]:
    out = wait_for(
        lambda: cluster.kubectl("get", resource, name, "-n", ns, "-o", "json", check=False).stdout,
        what=f"the {resource} {name}",
    )
    group: dict[str, Any] = json.loads(out)
    return group


def test_volcano_pod_group(
    jobs: Jobs, operator: OperatorProcess, cluster: Cluster, priority_class: str
) -> None:
    crd = install_crd(cluster, crds.VOLCANO)
    jobs.create(
        "vc",
        scheduling={"gangScheduler": "Volcano", "queueName": "research"},
        workers={"priorityClassName": priority_class},
    )
    group = stored_pod_group(cluster, crd, jobs.ns, "vc-gang")
    built = expected_pod_group(jobs, "vc", "scheduling.volcano.sh/v1beta1")
    assert crds.lost_fields(built["spec"], group["spec"]) == []
    assert crds.lost_fields(built["metadata"]["labels"], group["metadata"]["labels"]) == []
    assert group["spec"] == {
        "minMember": 4,
        "queue": "research",
        "minResources": {"nvidia.com/gpu": "8"},
        "priorityClassName": priority_class,
    }
    pods = wait_for(lambda: len(p := jobs.pods("vc")) == 4 and p, what="4 workers")
    for pod in pods:
        assert pod["spec"]["schedulerName"] == "volcano"
        assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "vc-gang"
        assert pod["spec"]["priorityClassName"] == priority_class
        assert not pod["spec"].get("schedulingGates")


def test_volcano_pod_group_without_a_queue_gets_volcanos_default_queue(
    jobs: Jobs, operator: OperatorProcess, cluster: Cluster
) -> None:
    crd = install_crd(cluster, crds.VOLCANO)
    jobs.create("vd", scheduling={"gangScheduler": "Volcano"}, workers={"gpusPerNode": 0})
    group = stored_pod_group(cluster, crd, jobs.ns, "vd-gang")
    built = expected_pod_group(jobs, "vd", "scheduling.volcano.sh/v1beta1")
    assert "queue" not in built["spec"]
    assert crds.lost_fields(built["spec"], group["spec"]) == []
    assert group["spec"] == {"minMember": 4, "minResources": {}, "queue": "default"}


def test_coscheduling_pod_group(jobs: Jobs, operator: OperatorProcess, cluster: Cluster) -> None:
    crd = install_crd(cluster, crds.COSCHEDULING)
    jobs.create("cs", scheduling={"gangScheduler": "Coscheduling", "scheduleTimeoutSeconds": 120})
    group = stored_pod_group(cluster, crd, jobs.ns, "cs-gang")
    built = expected_pod_group(jobs, "cs", "scheduling.x-k8s.io/v1alpha1")
    assert crds.lost_fields(built["spec"], group["spec"]) == []
    assert crds.lost_fields(built["metadata"]["labels"], group["metadata"]["labels"]) == []
    assert group["spec"] == {
        "minMember": 4,
        "minResources": {"nvidia.com/gpu": "8"},
        "scheduleTimeoutSeconds": 120,
    }
    pods = wait_for(lambda: len(p := jobs.pods("cs")) == 4 and p, what="4 workers")
    for pod in pods:
        assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
        assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "cs-gang"
        assert not pod["spec"].get("schedulingGates")


def test_coscheduling_timeout_beyond_int32_is_refused_at_admission(jobs: Jobs, cluster: Cluster) -> None:
    """The PodGroup's scheduleTimeoutSeconds is an int32: a job asking for more is refused with the
    field named, rather than accepted and left without a PodGroup."""
    manifest = {
        "apiVersion": "llmop.io/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": "ch"},
        "spec": {
            "data": {"prepare": False},
            "training": {"maxSteps": 1, "globalBatchSize": 1, "microBatchSize": 1},
            "workers": {"numNodes": 1},
            "scheduling": {"gangScheduler": "Coscheduling", "scheduleTimeoutSeconds": 2**31},
        },
    }
    out = cluster.kubectl("apply", "-n", jobs.ns, "-f", "-", input=json.dumps(manifest), check=False)
    assert out.returncode != 0 and "spec.scheduling.scheduleTimeoutSeconds" in out.stderr, out.stderr


# What the released schemas refuse (rejected) or cut (pruned: kept out of the stored object). The
# tests above are only worth something because the apiserver, with these CRDs, does both.
REJECTED: list[tuple[str, dict[str, Any], str]] = [
    ("scheduling.x-k8s.io/v1alpha1", {"minMember": 0}, "spec.minMember"),
    ("scheduling.x-k8s.io/v1alpha1", {"minMember": "4"}, "spec.minMember"),
    (
        "scheduling.x-k8s.io/v1alpha1",
        {"minMember": 1, "minResources": {"nvidia.com/gpu": "eight"}},
        "minResources",
    ),
    # Why the API bounds the timeout: the apiserver checks format int32.
    (
        "scheduling.x-k8s.io/v1alpha1",
        {"minMember": 1, "scheduleTimeoutSeconds": 2**31},
        "scheduleTimeoutSeconds",
    ),
    ("scheduling.volcano.sh/v1beta1", {"queue": "Team_A"}, "spec.queue"),
    ("scheduling.volcano.sh/v1beta1", {"minMember": -1}, "spec.minMember"),
]
PRUNED: list[tuple[str, dict[str, Any], str]] = [
    ("scheduling.x-k8s.io/v1alpha1", {"minMember": 1, "queue": "a"}, "queue"),
    ("scheduling.x-k8s.io/v1alpha1", {"minMember": 1, "priorityClassName": "high"}, "priorityClassName"),
    (
        "scheduling.volcano.sh/v1beta1",
        {"minMember": 1, "scheduleTimeoutSeconds": 60},
        "scheduleTimeoutSeconds",
    ),
    ("scheduling.volcano.sh/v1beta1", {"minMembers": 4}, "minMembers"),
]


def _pod_group(api_version: str, name: str, spec: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {"apiVersion": api_version, "kind": "PodGroup", "metadata": {"name": name}, "spec": spec}
    )


def test_released_schemas_reject_and_prune(cluster: Cluster, namespace: str) -> None:
    for path in (crds.VOLCANO, crds.COSCHEDULING):
        install_crd(cluster, path)
    for i, (api_version, spec, field) in enumerate(REJECTED):
        proc = cluster.kubectl(
            "create", "-n", namespace, "-f", "-", input=_pod_group(api_version, f"bad-{i}", spec), check=False
        )
        assert proc.returncode != 0 and "Invalid value" in proc.stderr and field in proc.stderr, (
            f"{api_version} {spec}: {proc.stderr}"
        )
    for i, (api_version, spec, field) in enumerate(PRUNED):
        # --validate=false (fieldValidation=Ignore) prunes as the apiserver's default (Warn: what
        # the operator's client gets) does; kubectl's own default (Strict) would refuse the field.
        name = f"cut-{i}"
        cluster.kubectl(
            "create",
            "--validate=false",
            "-n",
            namespace,
            "-f",
            "-",
            input=_pod_group(api_version, name, spec),
        )
        resource = crds.crd_name(crds.BY_API_VERSION[api_version])
        stored = cluster.kubectl_json("get", resource, name, "-n", namespace)["spec"]
        assert field not in stored, f"{api_version} kept {field}: {stored}"


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
