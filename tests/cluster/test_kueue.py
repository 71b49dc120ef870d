"""Kueue on the local cluster: the real controller (tests/kueue.py) admits every stage of a job.

Workers are one Kueue plain pod group per gang attempt (Kueue's pod integration), compression and
preparation are batch Jobs (its batch/Job integration). ClusterQueues hold `nvidia.com/gpu` quota.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.cluster.conftest import Jobs, OperatorProcess
from tests.cluster.test_compression import MESSAGE  # the kwok stand-in for llmtrain's termination message
from tests.kube import Cluster, wait_for
from tests.kueue import MANAGED_LABEL, Kueue

pytestmark = pytest.mark.cluster

KUEUE_API = "kueue.x-k8s.io/v1beta2"
WORKLOADS = "workloads.kueue.x-k8s.io"
# Each test job's gang: 4 workers x 2 GPUs (tests/cluster/conftest.py), so 8 GPUs.
GANG_GPUS = 8


@dataclass
class Queues:
    cluster: Cluster
    ns: str
    cluster_queue: str
    local_queue: str = "team-a"

    def workload(self, name: str) -> dict[str, Any] | None:
        out = self.cluster.kubectl("get", WORKLOADS, name, "-n", self.ns, "-o", "json", check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def admitted(self, name: str) -> bool:
        wl = self.workload(name)
        conditions = ((wl or {}).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Admitted" and c["status"] == "True" for c in conditions)

    def set_quota(self, gpus: int, cpu: str) -> None:
        body = json.dumps({"spec": self.cluster_queue_spec(gpus, cpu)})
        self.cluster.kubectl("patch", "clusterqueue", self.cluster_queue, "--type=merge", "-p", body)

    def cluster_queue_spec(self, gpus: int, cpu: str) -> dict[str, Any]:
        resources = {"cpu": cpu, "memory": "1Ti", "nvidia.com/gpu": str(gpus)}
        return {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.ns}},
            "resourceGroups": [
                {
                    "coveredResources": list(resources),
                    "flavors": [
                        {
                            "name": self.cluster_queue,
                            "resources": [{"name": k, "nominalQuota": v} for k, v in resources.items()],
                        }
                    ],
                }
            ],
            "preemption": {"withinClusterQueue": "LowerPriority"},
        }


@pytest.fixture
def queues(cluster: Cluster, namespace: str, kueue: Kueue) -> Iterator[Queues]:
    """A ResourceFlavor, a ClusterQueue for this test's namespace only, and LocalQueue ``team-a``."""
    cluster.kubectl("label", "namespace", namespace, f"{MANAGED_LABEL}=true")
    q = Queues(cluster, namespace, cluster_queue=f"cq-{namespace}")
    objects = [
        {"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": q.cluster_queue}},
        {
            "apiVersion": KUEUE_API,
            "kind": "ClusterQueue",
            "metadata": {"name": q.cluster_queue},
            "spec": q.cluster_queue_spec(GANG_GPUS, cpu="100"),
        },
        {
            "apiVersion": KUEUE_API,
            "kind": "LocalQueue",
            "metadata": {"name": q.local_queue, "namespace": namespace},
            "spec": {"clusterQueue": q.cluster_queue},
        },
    ]
    for obj in objects:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))
    yield q
    # Kueue keeps a ClusterQueue while workloads use it; the namespace's deletion ends those.
    for kind in ("clusterqueue", "resourceflavor"):
        cluster.kubectl("delete", kind, q.cluster_queue, "--wait=false", check=False)


def gated_by_kueue(pods: list[dict[str, Any]]) -> bool:
    """Every pod held by Kueue's gates only: its admission gate (and the topology gate its webhook adds)."""

    def gates(p: dict[str, Any]) -> list[str]:
        return [g["name"] for g in p["spec"].get("schedulingGates", [])]

    return bool(pods) and all(
        "kueue.x-k8s.io/admission" in gates(p) and all(g.startswith("kueue.x-k8s.io/") for g in gates(p))
        for p in pods
    )


def test_kueue_admits_a_gang_within_quota_and_the_next_one_waits_for_it(
    jobs: Jobs, operator: OperatorProcess, queues: Queues, kueue: Kueue
) -> None:
    jobs.create("first", scheduling={"queueName": queues.local_queue})
    jobs.wait_condition("first", "Running", timeout=90)
    assert queues.admitted("first-gang-1"), queues.workload("first-gang-1")
    assert all(not p["spec"].get("schedulingGates") for p in jobs.pods("first"))

    # The quota (8 GPUs) is used up: the second gang is created, gated, and waits, saying why.
    jobs.create("second", scheduling={"queueName": queues.local_queue})
    waiting = jobs.wait_condition("second", "GangScheduled", status="False", timeout=60)
    assert waiting["reason"] == "AwaitingAdmission" and "team-a" in waiting["message"]
    wait_for(lambda: len(p := jobs.pods("second")) == 4 and gated_by_kueue(p), what="4 gated workers")
    workload = wait_for(lambda: queues.workload("second-gang-1"), what="the second gang's Workload")
    pending = {c["type"]: c for c in workload["status"].get("conditions", [])}
    assert pending["QuotaReserved"]["status"] == "False", pending
    assert "nvidia.com/gpu" in pending["QuotaReserved"]["message"], pending
    time.sleep(3)  # Kueue does not admit it meanwhile
    assert jobs.status("second")["state"] == "Pending" and gated_by_kueue(jobs.pods("second"))

    # Deleting the first job gives its Workload back (its pods' finalizer would hold it otherwise):
    # the second gang is admitted and runs.
    jobs.cluster.kubectl("delete", "llmtrainingjob", "first", "-n", jobs.ns, "--timeout=60s")
    wait_for(lambda: queues.workload("first-gang-1") is None, timeout=60, what="first's Workload gone")
    jobs.wait_condition("second", "Running", timeout=90)
    assert queues.admitted("second-gang-1")


def test_preemption_by_a_higher_priority_gang_requeues_the_job_without_a_failure(
    jobs: Jobs, operator: OperatorProcess, queues: Queues, cluster: Cluster
) -> None:
    low, high = f"low-{jobs.ns}", f"high-{jobs.ns}"
    for name, value in ((low, 100), (high, 1000)):
        pc = {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name}}
        cluster.kubectl("apply", "-f", "-", input=json.dumps({**pc, "value": value}))
    try:
        queue = {"queueName": queues.local_queue}
        jobs.create(
            "batch", scheduling=queue, workers={"priorityClassName": low}, runPolicy={"backoffLimit": 0}
        )
        jobs.wait_condition("batch", "Running", timeout=90)

        jobs.create("urgent", scheduling=queue, workers={"priorityClassName": high})
        # Kueue evicts the low-priority pod group (TerminationTarget, then deletes its pods); the
        # operator restarts that gang as a disruption and hands back the evicted Workload, so the
        # high-priority gang gets the GPUs.
        jobs.wait_condition("urgent", "Running", timeout=120)
        status = wait_for(
            lambda: (s := jobs.status("batch")).get("attempt") == 2 and s, timeout=60, what="batch attempt 2"
        )
        # backoffLimit 0: a counted failure would have failed the job.
        assert status.get("restartCount", 0) == 0 and status["disruptionCount"] == 1, status
        assert status["state"] == "Pending", status
        reasons = [e["reason"] for e in jobs.events("batch")]
        assert "WorkerDisrupted" in reasons, reasons
        wait_for(
            lambda: queues.workload("batch-gang-1") is None, timeout=60, what="the evicted Workload gone"
        )
        wait_for(lambda: gated_by_kueue(jobs.pods("batch")), what="batch's next gang gated by Kueue")
        assert not queues.admitted("batch-gang-2")

        # Once the urgent job is gone the preempted one is admitted again and runs its next attempt.
        cluster.kubectl("delete", "llmtrainingjob", "urgent", "-n", jobs.ns, "--timeout=60s")
        jobs.wait_condition("batch", "Running", timeout=120)
        assert queues.admitted("batch-gang-2")
        assert jobs.condition("batch", "Failed") is None
    finally:
        for name in (low, high):
            cluster.kubectl("delete", "priorityclass", name, "--wait=false", check=False)


def test_compression_jobs_are_queued_by_kueue_one_at_a_time_within_cpu_quota(
    jobs: Jobs, operator: OperatorProcess, queues: Queues, cluster: Cluster
) -> None:
    # Three compression Jobs of 1 CPU each, 1 CPU of quota: Kueue runs them one after another.
    queues.set_quota(GANG_GPUS, cpu="1")
    compression = {
        "quantization": [{"method": "Int8WeightOnly"}, {"method": "Int4WeightOnly", "groupSize": 64}],
        "pruning": [{"method": "Structured", "sparsity": 0.25, "recoverySteps": 10}],
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}},
    }
    annotations = {"llmop.io/kwok-termination-message": json.dumps(MESSAGE)}
    jobs.create(
        "cmp",
        scheduling={"queueName": queues.local_queue},
        workers={"podAnnotations": annotations},
        compression=compression,
    )
    jobs.wait_condition("cmp", "Running", timeout=90)
    jobs.annotate_pods("cmp", {"llmop.io/kwok-exit-after": "1s"})

    seen_running: set[int] = set()

    def batch_jobs() -> list[dict[str, Any]]:
        out = cluster.kubectl_json(
            "get", "jobs", "-n", jobs.ns, "-l", "llmop.io/job-name=cmp,llmop.io/role=compress"
        )
        return list(out["items"])

    def all_complete() -> bool:
        js = batch_jobs()
        for j in js:
            assert j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queues.local_queue
        unsuspended = [
            j
            for j in js
            if not j["spec"].get("suspend")
            and not any(
                c["type"] == "Complete" and c["status"] == "True" for c in j["status"].get("conditions", [])
            )
        ]
        seen_running.add(len(unsuspended))
        done = [j for j in js if any(c["type"] == "Complete" for c in j["status"].get("conditions", []))]
        return len(js) == 3 and len(done) == 3

    wait_for(all_complete, timeout=180, what="three compression Jobs admitted in turn and complete")
    # Never two at once (1 CPU of quota), and each was held suspended while another ran.
    assert max(seen_running) <= 1, seen_running
    jobs.wait_condition("cmp", "Succeeded", timeout=60)
