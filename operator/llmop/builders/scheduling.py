"""PodGroups for gang schedulers (Volcano, scheduler-plugins coscheduling)."""

from __future__ import annotations

from llmop import naming
from llmop.builders import JobRef, Manifest
from llmop_contract.api.v1alpha1.workload import GangScheduler


def build_pod_group(job: JobRef) -> Manifest | None:
    sched = job.spec.scheduling
    w = job.spec.workers
    min_resources = {"nvidia.com/gpu": str(w.gpus_per_node * w.num_nodes)} if w.gpus_per_node else {}
    meta = job.metadata(naming.pod_group_name(job.name), naming.common_labels(job.name))
    if sched.gang_scheduler == GangScheduler.VOLCANO:
        spec: Manifest = {"minMember": w.num_nodes, "minResources": min_resources}
        if sched.queue_name:
            spec["queue"] = sched.queue_name
        if w.priority_class_name:
            # Volcano orders and preempts gangs by the PodGroup's priority, not its pods'.
            spec["priorityClassName"] = w.priority_class_name
        return {
            "apiVersion": "scheduling.volcano.sh/v1beta1",
            "kind": "PodGroup",
            "metadata": meta,
            "spec": spec,
        }
    if sched.gang_scheduler == GangScheduler.COSCHEDULING:
        return {
            "apiVersion": "scheduling.x-k8s.io/v1alpha1",
            "kind": "PodGroup",
            "metadata": meta,
            "spec": {
                "minMember": w.num_nodes,
                "minResources": min_resources,
                "scheduleTimeoutSeconds": sched.schedule_timeout_seconds,
            },
        }
    return None
