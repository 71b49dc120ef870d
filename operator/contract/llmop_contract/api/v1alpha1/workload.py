"""Where and how the training pods run: gang shape, placement, failure policy, storage."""

from __future__ import annotations

import re
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


class ObjectKeySelector(ApiModel):
    """A key of a Secret or ConfigMap in the job's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_1123_SUBDOMAIN)
    """Object name."""
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    """Key within it."""


class EnvVarSource(ApiModel):
    """Where a variable's value comes from; exactly one field is set."""

    rules = (
        Rule(
            "has(self.secretKeyRef) != has(self.configMapKeyRef)",
            lambda m: (m.secret_key_ref is None) != (m.config_map_key_ref is None),
            "valueFrom needs exactly one of secretKeyRef and configMapKeyRef",
        ),
    )

    secret_key_ref: ObjectKeySelector | None = None
    """A key of a Secret (the kubelet resolves it; the operator never reads the value)."""
    config_map_key_ref: ObjectKeySelector | None = None
    """A key of a ConfigMap."""


class EnvVar(ApiModel):
    """An environment variable of the trainer container in every stage: a value, or a Secret/ConfigMap key."""

    rules = (
        Rule(
            "!(has(self.value) && has(self.valueFrom))",
            lambda m: m.value is None or m.value_from is None,
            "an env entry takes value or valueFrom, not both",
        ),
    )

    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Variable name."""
    value: str | None = Field(None, max_length=32768)
    """Variable value (unset with valueFrom; neither is the empty string)."""
    value_from: EnvVarSource | None = None
    """Read the value from a Secret or ConfigMap key instead."""


class ObjectRef(ApiModel):
    """A Secret or ConfigMap in the job's namespace, by name."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_1123_SUBDOMAIN)
    """Object name."""


class EnvFromSource(ApiModel):
    """Every key of a Secret or ConfigMap as environment variables; exactly one ref is set."""

    rules = (
        Rule(
            "has(self.secretRef) != has(self.configMapRef)",
            lambda m: (m.secret_ref is None) != (m.config_map_ref is None),
            "envFrom needs exactly one of secretRef and configMapRef",
        ),
    )

    prefix: str | None = Field(None, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Prepended to every key."""
    secret_ref: ObjectRef | None = None
    """The Secret."""
    config_map_ref: ObjectRef | None = None
    """The ConfigMap."""


class Stage(StrEnum):
    """The kinds of pod a job runs (what an extra volume is mounted in)."""

    PREPARE = "Prepare"
    TRAIN = "Train"
    COMPRESS = "Compress"
    SERVE = "Serve"


# The operator's own volumes and mount points in every pod (builders/storage.py): an extra volume
# may neither take one of these names nor mount over, under or above one of these paths.
RESERVED_VOLUME_NAMES = ("storage", "config", "tmp", "shm")
RESERVED_MOUNT_PATHS = ("/var/lib/llmop", "/etc/llmop", "/tmp", "/dev/shm")


def _mount_clash(path: str) -> bool:
    path = path.rstrip("/") or "/"
    return any(
        path == p or path.startswith(p + "/") or p.startswith(path.rstrip("/") + "/")
        for p in RESERVED_MOUNT_PATHS
    )


_RESERVED_PATHS_CEL = "[" + ", ".join(f"'{p}'" for p in RESERVED_MOUNT_PATHS) + "]"
_RESERVED_NAMES_CEL = "[" + ", ".join(f"'{n}'" for n in RESERVED_VOLUME_NAMES) + "]"


class ClaimSource(ApiModel):
    """An existing PersistentVolumeClaim in the job's namespace."""

    claim_name: str = Field(min_length=1, max_length=253, pattern=DNS_1123_SUBDOMAIN)
    """Claim name."""


class ConfigMapSource(ApiModel):
    """A ConfigMap, each key a file."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_1123_SUBDOMAIN)
    """ConfigMap name."""


class SecretSource(ApiModel):
    """A Secret, each key a file (mode 0440, readable by the trainer's group)."""

    secret_name: str = Field(min_length=1, max_length=253, pattern=DNS_1123_SUBDOMAIN)
    """Secret name."""


class ExtraVolume(ApiModel):
    """A volume of the user's (a dataset claim, a ConfigMap, a Secret) mounted into the job's pods.

    Spec paths (data sources, the thesaurus, model.pretrained) may point into mountPath. hostPath
    is not offered: a training job has no business with a node's filesystem, and the development
    runtime's claims already map to local directories.
    """

    rules = (
        Rule(
            "[has(self.persistentVolumeClaim), has(self.configMap), has(self.secret)]"
            ".filter(x, x).size() == 1",
            lambda m: sum(x is not None for x in (m.persistent_volume_claim, m.config_map, m.secret)) == 1,
            "a volume needs exactly one of persistentVolumeClaim, configMap and secret",
        ),
        Rule(
            f"!({_RESERVED_NAMES_CEL}.exists(n, n == self.name))",
            lambda m: m.name not in RESERVED_VOLUME_NAMES,
            f"volume names {', '.join(RESERVED_VOLUME_NAMES)} are the operator's own",
            ".name",
        ),
        Rule(
            f"!({_RESERVED_PATHS_CEL}.exists(p, self.mountPath == p || self.mountPath.startsWith(p + '/')"
            " || p.startsWith(self.mountPath + '/') || self.mountPath == '/'))",
            lambda m: not _mount_clash(m.mount_path),
            f"mountPath must not be, contain or lie inside the operator's mounts ({', '.join(RESERVED_MOUNT_PATHS)})",
            ".mountPath",
        ),
    )

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Volume name (a DNS-1123 label), unique in the list."""
    mount_path: str = Field(min_length=2, max_length=1024, pattern=r"^/[^:]*[^/:]$")
    """Absolute path in the trainer container."""
    read_only: bool = True
    """Mount read-only (the default: datasets and credentials are read, not written)."""
    sub_path: str | None = Field(None, min_length=1, max_length=1024, pattern=r"^[^/]")
    """Mount only this path inside the volume."""
    stages: list[Stage] = Field(default_factory=list, max_length=4)
    """The kinds of pod it is mounted in; empty mounts it in every one (Prepare, Train, Compress, Serve)."""
    persistent_volume_claim: ClaimSource | None = None
    """An existing claim (ReadOnlyMany or ReadWriteMany for a multi-node gang)."""
    config_map: ConfigMapSource | None = None
    """A ConfigMap."""
    secret: SecretSource | None = None
    """A Secret."""

    def mounted_in(self, stage: Stage) -> bool:
        return not self.stages or stage in self.stages


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
        Rule(
            # has(): a list left out has no default in the schema, and CEL cannot read a missing key.
            "!has(self.volumes) || (self.volumes.all(v, self.volumes.exists_one(w, w.name == v.name))"
            " && self.volumes.all(v, self.volumes.exists_one(w, w.mountPath == v.mountPath)))",
            lambda m: (
                len({v.name for v in m.volumes}) == len(m.volumes)
                and len({v.mount_path for v in m.volumes}) == len(m.volumes)
            ),
            "volumes need distinct names and distinct mountPaths",
            ".volumes",
        ),
        Rule(
            "!has(self.minNodes) || self.minNodes <= self.numNodes",
            lambda m: m.min_nodes is None or m.min_nodes <= m.num_nodes,
            "minNodes must not exceed numNodes (the preferred size)",
            ".minNodes",
        ),
        Rule(
            "!has(self.maxNodes) || self.maxNodes >= self.numNodes",
            lambda m: m.max_nodes is None or m.max_nodes >= m.num_nodes,
            "maxNodes must not be below numNodes (the preferred size)",
            ".maxNodes",
        ),
    )

    num_nodes: int = Field(1, ge=1, le=1024)
    """Worker pods (nodes) in the gang: the preferred size of an elastic gang."""
    min_nodes: int | None = Field(None, ge=1, le=1024)
    """Elastic gangs: the fewest nodes to train on. A gang short of a node that no replacement fits within resizeGraceSeconds restarts on the nodes that fit, not below this, from its last checkpoint. Unset: numNodes (never shrinks)."""
    max_nodes: int | None = Field(None, ge=1, le=1024)
    """Elastic gangs: the most nodes to train on; a gang below it grows, at a checkpoint, when capacity for more fits. Unset: numNodes (grows back to numNodes only)."""
    resize_grace_seconds: int = Field(120, ge=0, le=86400)
    """Elastic gangs: how long a gang that cannot be whole waits for capacity before it shrinks."""
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
    """Environment variables of the trainer in every stage's pod (prepare, workers, compression, ONNX export, serving), after the operator's own so that they win (e.g. NCCL tuning, credentials from a Secret key)."""
    env_from: list[EnvFromSource] = Field(default_factory=list, max_length=16)
    """Secrets and ConfigMaps whose keys become environment variables in every stage's pod."""
    volumes: list[ExtraVolume] = Field(default_factory=list, max_length=16)
    """Extra volumes mounted in the stages each names (datasets, models, credential files)."""
    pod_labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=32)
    """Extra labels on every worker pod (the operator's own llmop.io/* labels win)."""
    pod_annotations: dict[str, str] = Field(default_factory=dict, max_length=32)
    """Extra annotations on every worker pod, e.g. for sidecar injection or log collection."""

    @property
    def elastic(self) -> bool:
        """Whether the gang may run at another size than numNodes."""
        return self.smallest < self.num_nodes or self.largest > self.num_nodes

    @property
    def smallest(self) -> int:
        return self.min_nodes if self.min_nodes is not None else self.num_nodes

    @property
    def largest(self) -> int:
        return self.max_nodes if self.max_nodes is not None else self.num_nodes


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
    """Kueue LocalQueue: every stage's pods are admitted by Kueue (workers as one plain pod group, prepare and compression as batch Jobs, serving as a Deployment); or the Volcano queue when gangScheduler is Volcano."""
    # At most an int32: the coscheduler's PodGroup carries it in an int32 field.
    schedule_timeout_seconds: int = Field(600, ge=1, le=2**31 - 1)
    """How long a gang may wait unplaced before the Unschedulable condition is raised."""

    @property
    def kueue_queue(self) -> str | None:
        """The Kueue LocalQueue every stage is submitted to (None: Kueue is not used)."""
        return self.queue_name if self.gang_scheduler == GangScheduler.NONE else None


class AddressingStyle(StrEnum):
    AUTO = "Auto"
    PATH = "Path"
    VIRTUAL = "Virtual"


class ObjectStore(ApiModel):
    """How every stage reaches object storage: s3://, gs:// and az:// in data sources, model.pretrained and storage.remote."""

    endpoint: str | None = Field(None, max_length=2048, pattern=r"^https?://[^/@\s]+(/\S*)?$")
    """An S3-compatible endpoint (MinIO, SeaweedFS, Ceph RGW, ...), set as AWS_ENDPOINT_URL_S3 in every pod; unset uses AWS."""
    region: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$")
    """S3 region (AWS_DEFAULT_REGION)."""
    addressing_style: AddressingStyle = AddressingStyle.AUTO
    """S3 bucket addressing: Path for most S3-compatible servers, Virtual for AWS, Auto lets botocore choose."""
    credentials_secret: str | None = Field(None, min_length=1, max_length=253, pattern=DNS_1123_SUBDOMAIN)
    """A Secret whose keys become environment variables of every stage (envFrom): AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3; AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY for Azure; for GCS mount the key file with workers.volumes and set GOOGLE_APPLICATION_CREDENTIALS. The operator never reads it."""


class RemoteStorage(ApiModel):
    """A copy of the job's checkpoints and models in object storage: losing the volume loses nothing."""

    rules = (
        Rule(
            "self.uri.matches('^(s3|gs|gcs|az|abfs)://[^/@]+(/.*)?$')",
            lambda m: re.fullmatch(r"(s3|gs|gcs|az|abfs)://[^/@]+(/.*)?", m.uri) is not None,
            "storage.remote.uri must be an object-store URL with a bucket: s3://BUCKET/PREFIX, gs://, az://"
            " (credentials go in storage.objectStore.credentialsSecret, never in the URL)",
            ".uri",
        ),
    )

    uri: str = Field(min_length=6, max_length=2048)
    """Prefix the job uploads under: checkpoints/step-N/ (each visible once its manifest, uploaded last, is there), model/, adapter/ and compressed/STAGE/."""
    max_pending_uploads: int = Field(2, ge=1, le=16)
    """Saved checkpoints waiting for upload before the next save waits for one to finish (each holds its size on the volume until uploaded)."""


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
    object_store: ObjectStore = Field(default_factory=ObjectStore)
    """Endpoint, region and credentials for object-store URLs anywhere in the spec."""
    remote: RemoteStorage | None = None
    """Upload checkpoints (in the background) and the exported and compressed models; a job whose volume lost its checkpoints resumes from there."""
