"""Names and labels of everything the operator creates for a job, in one place."""

from __future__ import annotations

from llmop_contract.api.v1alpha1.job import GROUP

JOB_NAME_LABEL = f"{GROUP}/job-name"
ROLE_LABEL = f"{GROUP}/role"
ATTEMPT_LABEL = f"{GROUP}/attempt"
INDEX_LABEL = f"{GROUP}/worker-index"
MANAGED_BY = "llmop"

STAGE_LABEL = f"{GROUP}/stage"
PHASE_LABEL = f"{GROUP}/prepare-phase"  # data.distributed: the preparation phase of a Job and its pods
# Set by the Job controller on an Indexed Job's pods (and in JOB_COMPLETION_INDEX).
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

ROLE_WORKER = "worker"
ROLE_PREPARE = "prepare"
ROLE_COMPRESS = "compress"
ROLE_SERVE = "serve"

# Our own scheduling gate: pods of a gang stay gated until the whole gang fits (see capacity.py).
GANG_GATE = f"{GROUP}/gang"
KUEUE_GATE = "kueue.x-k8s.io/admission"
# Kueue's labels: the LocalQueue a Job, Deployment or pod is submitted to, and a plain pod group.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_COUNT = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_WORKLOAD_API = "kueue.x-k8s.io/v1beta2"
# Kueue sets this condition on the pods it stops (preemption, eviction) before deleting them.
KUEUE_TERMINATION_TARGET = "TerminationTarget"

CONFIG_MOUNT = "/etc/llmop"
CONFIG_FILE = "config.yaml"
STORAGE_MOUNT = "/var/lib/llmop"


def service_name(job: str) -> str:
    """Headless Service; workers resolve as <pod>.<service>.<namespace>.svc."""
    return f"{job}-workers"


def worker_name(job: str, index: int) -> str:
    # Stable across attempts: a restart deletes the whole gang before recreating it, so a name is
    # never held by two pods, and worker 0's DNS name (MASTER_ADDR) never changes.
    return f"{job}-worker-{index}"


def service_account_name(job: str) -> str:
    return f"{job}-trainer"


def config_map_name(job: str) -> str:
    return f"{job}-config"


def claim_name(job: str) -> str:
    return f"{job}-storage"


def prepare_job_name(job: str) -> str:
    return f"{job}-prepare"


def prepare_phase_job_name(job: str, phase: str) -> str:
    # At most 40 + 16 characters; its pods' hostnames add "-<index>" (at most 4), within 63.
    return f"{job}-prepare-{phase}"


def compress_job_name(job: str, stage: str) -> str:
    # job names are at most 40 characters and stages at most 12 ("quantize-7"), well within 63.
    return f"{job}-{stage}"


def serving_name(job: str) -> str:
    return f"{job}-serve"


def pod_group_name(job: str) -> str:
    return f"{job}-gang"


def kueue_pod_group(job: str, attempt: int) -> str:
    """One Kueue plain pod group, and so one Kueue Workload of this name, per gang attempt."""
    return f"{pod_group_name(job)}-{attempt}"


def selector(job: str, role: str | None = None) -> dict[str, str]:
    labels = {JOB_NAME_LABEL: job}
    if role:
        labels[ROLE_LABEL] = role
    return labels


def common_labels(job: str, role: str | None = None) -> dict[str, str]:
    return {
        **selector(job, role),
        "app.kubernetes.io/name": "llmtrain",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }
