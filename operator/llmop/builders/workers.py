"""The training gang: a headless Service and one worker pod per node."""

from __future__ import annotations

from typing import Any

from llmop import naming
from llmop.builders import JobRef, Manifest, storage
from llmop_contract.api.v1alpha1.workload import GangScheduler

TRAINER_UID = 1000
# Exit code the trainer uses after writing a checkpoint on SIGTERM (EX_TEMPFAIL): "preempted".
PREEMPTED_EXIT_CODE = 75

SCHEDULER_NAMES = {
    GangScheduler.VOLCANO: "volcano",
    GangScheduler.COSCHEDULING: "scheduler-plugins-scheduler",
}


def build_service(job: JobRef) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": job.metadata(
            naming.service_name(job.name), naming.common_labels(job.name, naming.ROLE_WORKER)
        ),
        "spec": {
            "clusterIP": "None",
            # Workers must find each other before they are Ready: rendezvous happens during startup.
            "publishNotReadyAddresses": True,
            "selector": naming.selector(job.name, naming.ROLE_WORKER),
            "ports": [
                {"name": "rendezvous", "port": job.spec.workers.master_port},
                {"name": "metrics", "port": job.spec.workers.metrics_port},
            ],
        },
    }


def build_service_account(job: JobRef) -> Manifest:
    """The trainer's identity: bound to no Role, so a compromised pod can do nothing to the API."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": job.metadata(naming.service_account_name(job.name), naming.common_labels(job.name)),
        "automountServiceAccountToken": False,
    }


def master_addr(job: JobRef) -> str:
    return f"{naming.worker_name(job.name, 0)}.{naming.service_name(job.name)}.{job.namespace}.svc"


def _env(job: JobRef, index: int, attempt: int) -> list[Manifest]:
    w = job.spec.workers
    plain = {
        "MASTER_ADDR": master_addr(job),
        "MASTER_PORT": str(w.master_port),
        "NNODES": str(w.num_nodes),
        "NODE_RANK": str(index),
        "NPROC_PER_NODE": str(w.procs_per_node),
        "LLMOP_JOB_NAME": job.name,
        "LLMOP_JOB_NAMESPACE": job.namespace,
        "LLMOP_ATTEMPT": str(attempt),
        "LLMOP_METRICS_PORT": str(w.metrics_port),
        # Caches that default to $HOME must land on a writable volume (root filesystem is read-only).
        "HOME": "/tmp",
        "TRITON_CACHE_DIR": "/tmp/triton",
        "TORCH_EXTENSIONS_DIR": "/tmp/torch_extensions",
    }
    env: list[Manifest] = [{"name": k, "value": v} for k, v in plain.items()]
    # Rank 0 serves metrics on its pod IP, which is where the operator scrapes progress from.
    env.append({"name": "LLMOP_METRICS_ADDR", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    env += [{"name": e.name, "value": e.value} for e in w.env]
    return env


def _resources(job: JobRef) -> Manifest:
    w = job.spec.workers
    requests: dict[str, Any] = {k: str(v) for k, v in w.resources_per_node.requests.items()}
    limits: dict[str, Any] = {k: str(v) for k, v in w.resources_per_node.limits.items()}
    if w.gpus_per_node:
        # Extended resources must have requests == limits.
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(w.gpus_per_node)
    out: Manifest = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def uses_kueue(job: JobRef) -> bool:
    sched = job.spec.scheduling
    return bool(sched.queue_name) and sched.gang_scheduler == GangScheduler.NONE


def scheduling_gates(job: JobRef) -> list[str]:
    sched = job.spec.scheduling
    if uses_kueue(job):
        return [naming.KUEUE_GATE]  # Kueue lifts it when the whole pod group is admitted
    if sched.gang_scheduler == GangScheduler.NONE:
        return [naming.GANG_GATE]  # the operator lifts it when the whole gang fits
    return []  # Volcano / coscheduling place the PodGroup all or nothing themselves


def build_worker(job: JobRef, index: int, attempt: int) -> Manifest:
    w = job.spec.workers
    sched = job.spec.scheduling
    labels = {
        **w.pod_labels,
        **naming.common_labels(job.name, naming.ROLE_WORKER),
        naming.ATTEMPT_LABEL: str(attempt),
        naming.INDEX_LABEL: str(index),
    }
    annotations = dict(w.pod_annotations)
    if uses_kueue(job):
        assert sched.queue_name
        labels["kueue.x-k8s.io/queue-name"] = sched.queue_name
        labels["kueue.x-k8s.io/pod-group-name"] = f"{naming.pod_group_name(job.name)}-{attempt}"
        annotations["kueue.x-k8s.io/pod-group-total-count"] = str(w.num_nodes)
    if sched.gang_scheduler == GangScheduler.VOLCANO:
        annotations["scheduling.k8s.io/group-name"] = naming.pod_group_name(job.name)
    elif sched.gang_scheduler == GangScheduler.COSCHEDULING:
        labels["scheduling.x-k8s.io/pod-group"] = naming.pod_group_name(job.name)

    pod_spec: Manifest = {
        "restartPolicy": "Never",  # the operator restarts the whole gang, never a single pod
        "hostname": naming.worker_name(job.name, index),
        "subdomain": naming.service_name(job.name),
        "serviceAccountName": naming.service_account_name(job.name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 120,  # time to write a checkpoint on SIGTERM
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "trainer",
                "image": w.image,
                "imagePullPolicy": w.image_pull_policy,
                "command": ["llmtrain"],
                "args": ["train", f"{naming.CONFIG_MOUNT}/{naming.CONFIG_FILE}"],
                "env": _env(job, index, attempt),
                "ports": [
                    {"name": "rendezvous", "containerPort": w.master_port},
                    {"name": "metrics", "containerPort": w.metrics_port},
                ],
                "resources": _resources(job),
                "volumeMounts": storage.volume_mounts(),
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        "volumes": storage.volumes(job),
    }
    if gates := scheduling_gates(job):
        pod_spec["schedulingGates"] = [{"name": g} for g in gates]
    if scheduler := sched.scheduler_name or SCHEDULER_NAMES.get(sched.gang_scheduler):
        pod_spec["schedulerName"] = scheduler
    if w.node_selector:
        pod_spec["nodeSelector"] = dict(w.node_selector)
    if w.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in w.tolerations]
    if w.affinity:
        pod_spec["affinity"] = w.affinity
    if w.priority_class_name:
        pod_spec["priorityClassName"] = w.priority_class_name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": job.metadata(naming.worker_name(job.name, index), labels, annotations),
        "spec": pod_spec,
    }


def build_gang(job: JobRef, attempt: int) -> list[Manifest]:
    return [build_worker(job, i, attempt) for i in range(job.spec.workers.num_nodes)]
