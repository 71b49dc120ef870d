"""The training gang: a headless Service and one worker pod per node."""

from __future__ import annotations

from typing import Any

from llmop import naming
from llmop.builders import JobRef, Manifest, pod
from llmop_contract.api.v1alpha1.workload import GangScheduler, Stage
from llmop_contract.protocol import Env

TRAINER_UID = pod.TRAINER_UID
# Kept for observe.py until it reads ExitCode.PREEMPTED itself.
CHECKPOINT_GRACE_SECONDS = 120  # time to write a checkpoint on SIGTERM
GPU = "nvidia.com/gpu"

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
    return pod.service_account(job)


def worker_addr(job: JobRef, index: int) -> str:
    """Worker ``index``'s name through the headless Service (its hostname and subdomain).

    torchrun's c10d rendezvous ranks the nodes by this name, sorted: ``<job>-worker-0.`` sorts before
    every other index (none of them starts with a 0), so worker 0 is always group rank 0.
    """
    return f"{naming.worker_name(job.name, index)}.{naming.service_name(job.name)}.{job.namespace}.svc"


def master_addr(job: JobRef) -> str:
    """The c10d rendezvous endpoint's host: worker 0, whose launcher hosts the store."""
    return worker_addr(job, 0)


def _env(job: JobRef, index: int, attempt: int) -> list[Manifest]:
    w = job.spec.workers
    rendezvous = {
        "MASTER_ADDR": master_addr(job),
        "MASTER_PORT": str(w.master_port),
        "NNODES": str(w.num_nodes),
        "NODE_RANK": str(index),
        "NPROC_PER_NODE": str(w.procs_per_node),
        Env.NODE_ADDR: worker_addr(job, index),
    }
    return [
        *(pod.var(k, v) for k, v in rendezvous.items()),
        *pod.identity_env(job),
        pod.var(Env.ATTEMPT, str(attempt)),
        pod.var(Env.METRICS_PORT, str(w.metrics_port)),
        *pod.cache_env(),
        # Rank 0 serves metrics on its pod IP, which is where the operator scrapes progress from.
        pod.field_var(Env.METRICS_ADDR, "status.podIP"),
    ]


def resources(job: JobRef) -> Manifest:
    """A worker's requests and limits: spec.workers.resourcesPerNode plus its GPUs."""
    w = job.spec.workers
    requests: dict[str, Any] = dict(w.resources_per_node.requests)
    limits: dict[str, Any] = dict(w.resources_per_node.limits)
    if w.gpus_per_node:
        # Extended resources must have requests == limits.
        requests[GPU] = limits[GPU] = str(w.gpus_per_node)
    return pod.resources(requests, limits)


def uses_kueue(job: JobRef) -> bool:
    return job.spec.scheduling.kueue_queue is not None


def scheduling_gates(job: JobRef) -> list[str]:
    sched = job.spec.scheduling
    if uses_kueue(job):
        return [naming.KUEUE_GATE]  # Kueue lifts it when the whole pod group is admitted
    if sched.gang_scheduler == GangScheduler.NONE:
        return [naming.GANG_GATE]  # the operator lifts it when the whole gang fits
    return []  # Volcano / coscheduling place the PodGroup all or nothing themselves


def _gang_scheduling(job: JobRef) -> Manifest:
    """What puts a worker into its gang's scheduling group: gates and scheduler on the pod spec."""
    sched = job.spec.scheduling
    spec: Manifest = {}
    if gates := scheduling_gates(job):
        spec["schedulingGates"] = [{"name": g} for g in gates]
    if scheduler := sched.scheduler_name or SCHEDULER_NAMES.get(sched.gang_scheduler):
        spec["schedulerName"] = scheduler
    return spec


def _metadata(job: JobRef, index: int, attempt: int) -> Manifest:
    w = job.spec.workers
    sched = job.spec.scheduling
    labels = {
        **w.pod_labels,
        **naming.common_labels(job.name, naming.ROLE_WORKER),
        naming.ATTEMPT_LABEL: str(attempt),
        naming.INDEX_LABEL: str(index),
    }
    annotations = dict(w.pod_annotations)
    if queue := sched.kueue_queue:
        labels[naming.KUEUE_QUEUE_LABEL] = queue
        labels[naming.KUEUE_POD_GROUP_LABEL] = naming.kueue_pod_group(job.name, attempt)
        annotations[naming.KUEUE_POD_GROUP_COUNT] = str(w.num_nodes)
    if sched.gang_scheduler == GangScheduler.VOLCANO:
        annotations["scheduling.k8s.io/group-name"] = naming.pod_group_name(job.name)
    elif sched.gang_scheduler == GangScheduler.COSCHEDULING:
        labels["scheduling.x-k8s.io/pod-group"] = naming.pod_group_name(job.name)
    return job.metadata(naming.worker_name(job.name, index), labels, annotations)


def worker_pod_spec(job: JobRef, index: int = 0, attempt: int = 0) -> Manifest:
    """Worker `index`'s pod spec. Members of a gang differ only in their hostname and their
    NODE_RANK / LLMOP_ATTEMPT variables, so the default is enough to read a worker's requests and
    placement (gang admission)."""
    w = job.spec.workers
    main = pod.container(
        job, Stage.TRAIN, "trainer", ["train", pod.CONFIG_PATH], _env(job, index, attempt), resources(job)
    )
    main["ports"] = [
        {"name": "rendezvous", "containerPort": w.master_port},
        {"name": "metrics", "containerPort": w.metrics_port},
    ]
    return {
        **pod.pod_spec(job, Stage.TRAIN, main),
        "restartPolicy": "Never",  # the operator restarts the whole gang, never a single pod
        "terminationGracePeriodSeconds": CHECKPOINT_GRACE_SECONDS,
        # <hostname>.<subdomain> resolves through the headless Service: MASTER_ADDR is worker 0's.
        "hostname": naming.worker_name(job.name, index),
        "subdomain": naming.service_name(job.name),
        **_gang_scheduling(job),
    }


def build_worker(job: JobRef, index: int, attempt: int) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(job, index, attempt),
        "spec": worker_pod_spec(job, index, attempt),
    }


def build_gang(job: JobRef, attempt: int) -> list[Manifest]:
    return [build_worker(job, i, attempt) for i in range(job.spec.workers.num_nodes)]
