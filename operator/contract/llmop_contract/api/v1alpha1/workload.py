"""Where and how the training pods run: gang shape, placement, failure policy, storage."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field

from llmop_contract.api.base import ApiModel, Quantity, Rule

DEFAULT_IMAGE = "ghcr.io/llmop/trainer:0.1.0"

# What the apiserver demands of what the operator copies into its children (apimachinery's
# validation): the CRD cannot see that a value lands in a pod, so without these a bad one is admitted
# and every create of the pod, PodGroup or Kueue label fails 422.
# A label value: at most 63 letters, digits, '-', '_' and '.', starting and ending alphanumeric.
LabelValue = Annotated[str, Field(max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")]
DNS_1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class ResourceRequirements(ApiModel):
    """Per-node CPU, memory and other resources (GPUs are added from gpusPerNode)."""

    requests: dict[str, Quantity] = Field(default_factory=dict, max_length=16)
    """Resources each worker pod requests, e.g. cpu: "32", memory: 256Gi."""
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=16)
    """Resource limits of each worker pod."""


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(ApiModel):
    """A Kubernetes toleration, copied to every worker pod."""

    key: str | None = Field(None, max_length=316)
    """Taint key; empty with operator Exists tolerates everything."""
    operator: TolerationOperator = TolerationOperator.EQUAL
    """Exists or Equal."""
    value: str | None = Field(None, max_length=63)
    """Taint value for Equal."""
    effect: TaintEffect | None = None
    """Taint effect to match; unset matches all."""
    toleration_seconds: int | None = Field(None, ge=0)
    """For NoExecute: how long the pod stays bound after the taint appears."""


class EnvVar(ApiModel):
    """A plain environment variable for the trainer container."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Variable name."""
    value: str = Field("", max_length=32768)
    """Variable value."""


class WorkersSpec(ApiModel):
    """The gang: numNodes worker pods, each launching procsPerNode training processes."""

    rules = (
        Rule(
            "self.gpusPerNode == 0 || self.gpusPerNode == self.procsPerNode",
            lambda m: m.gpus_per_node in (0, m.procs_per_node),
            "procsPerNode must equal gpusPerNode (one process per GPU), or gpusPerNode must be 0 for CPU training",
            ".procsPerNode",
        ),
        Rule(
            "self.masterPort != self.metricsPort",
            lambda m: m.master_port != m.metrics_port,
            "masterPort and metricsPort must differ: both listen on every worker pod",
            ".metricsPort",
        ),
    )

    num_nodes: int = Field(1, ge=1, le=1024)
    """Worker pods (nodes) in the gang."""
    procs_per_node: int = Field(1, ge=1, le=64)
    """Training processes per node (torchrun nproc_per_node)."""
    gpus_per_node: int = Field(1, ge=0, le=64)
    """nvidia.com/gpu requested by each worker; 0 for CPU-only training."""
    image: str = Field(DEFAULT_IMAGE, min_length=1, max_length=512)
    """Trainer container image."""
    image_pull_policy: str = Field("IfNotPresent", pattern=r"^(Always|IfNotPresent|Never)$")
    """Image pull policy."""
    resources_per_node: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """CPU, memory and extra resources per worker pod."""
    node_selector: dict[str, LabelValue] = Field(default_factory=dict, max_length=32)
    """Node labels every worker must match, e.g. nvidia.com/gpu.product."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Tolerations for tainted GPU nodes."""
    affinity: dict[str, Any] | None = None
    """A Kubernetes Affinity object copied to every worker pod."""
    priority_class_name: str | None = Field(None, max_length=253, pattern=DNS_1123_SUBDOMAIN)
    """PriorityClass of the worker pods."""
    master_port: int = Field(29500, ge=1024, le=65535)
    """Rendezvous port on worker 0."""
    metrics_port: int = Field(9400, ge=1024, le=65535)
    """Port of the rank-0 trainer's Prometheus endpoint."""
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    """Extra environment variables for the trainer (e.g. NCCL tuning)."""
    pod_labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=32)
    """Extra labels on every worker pod (the operator's own llmop.io/* labels win)."""
    pod_annotations: dict[str, str] = Field(default_factory=dict, max_length=32)
    """Extra annotations on every worker pod, e.g. for sidecar injection or log collection."""


class RestartPolicy(StrEnum):
    ON_FAILURE = "OnFailure"
    NEVER = "Never"
    EXIT_CODE = "ExitCode"


class ExitCodeAction(StrEnum):
    RESTART = "Restart"
    FAIL = "Fail"


class ExitCodeRule(ApiModel):
    """What to do when a worker exits with one of these codes."""

    action: ExitCodeAction
    """Restart the gang (counts against backoffLimit) or fail the job."""
    exit_codes: list[Annotated[int, Field(ge=1, le=255)]] = Field(min_length=1, max_length=255)
    """Container exit codes (1-255) this rule matches."""


class RunPolicy(ApiModel):
    """Restarts, deadlines, suspension and clean-up."""

    backoff_limit: int = Field(3, ge=0, le=1000)
    """Gang restarts allowed for failures; evictions, preemptions and node loss do not count."""
    restart_policy: RestartPolicy = RestartPolicy.ON_FAILURE
    """OnFailure restarts on any failure; Never fails at once; ExitCode consults exitCodeRules, then treats 1-127 as permanent and 128-255 as retryable."""
    exit_code_rules: list[ExitCodeRule] = Field(default_factory=list, max_length=32)
    """Rules checked in order before restartPolicy's default."""
    active_deadline_seconds: int | None = Field(None, ge=1)
    """Fail the job (DeadlineExceeded) once it has run this long, restarts included."""
    ttl_seconds_after_finished: int | None = Field(None, ge=0)
    """Delete the job this long after it Succeeded or Failed."""
    suspend: bool = False
    """Delete the running pods and keep the job's state; false again resumes from the checkpoint."""


class GangScheduler(StrEnum):
    NONE = "None"
    VOLCANO = "Volcano"
    COSCHEDULING = "Coscheduling"


class SchedulingSpec(ApiModel):
    """Gang scheduling and quota."""

    rules = (
        Rule(
            "self.gangScheduler != 'Coscheduling' || !has(self.queueName)",
            lambda m: m.gang_scheduler != GangScheduler.COSCHEDULING or m.queue_name is None,
            "queueName applies to Kueue (gangScheduler None) or Volcano; the coscheduler has no queues",
            ".queueName",
        ),
    )

    gang_scheduler: GangScheduler = GangScheduler.NONE
    """Create a PodGroup for Volcano or the scheduler-plugins coscheduler."""
    scheduler_name: str | None = Field(None, max_length=253)
    """schedulerName for the worker pods (defaults follow gangScheduler)."""
    # Also the kueue.x-k8s.io/queue-name label value: an object name that is a label value too.
    queue_name: str | None = Field(None, max_length=63, pattern=DNS_1123_SUBDOMAIN)
    """Kueue LocalQueue (the gang is admitted as one Kueue plain pod group), or the Volcano queue when gangScheduler is Volcano."""
    schedule_timeout_seconds: int = Field(600, ge=1)
    """How long a gang may wait unplaced before the Unschedulable condition is raised."""


class StorageSpec(ApiModel):
    """Shared storage for prepared data, checkpoints and exported models."""

    claim_name: str | None = Field(None, max_length=253)
    """An existing ReadWriteMany PersistentVolumeClaim; unset creates one owned by the job."""
    size: Quantity = "50Gi"
    """Size of the claim the operator creates."""
    storage_class_name: str | None = Field(None, max_length=253)
    """StorageClass of the claim the operator creates."""
    access_mode: str = Field("ReadWriteMany", pattern=r"^(ReadWriteMany|ReadWriteOnce|ReadWriteOncePod)$")
    """Access mode of the claim the operator creates; multi-node jobs need ReadWriteMany."""
