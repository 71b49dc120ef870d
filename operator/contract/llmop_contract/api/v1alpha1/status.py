"""Observed state, written only by the operator through the status subresource."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from llmop_contract.api.base import ApiModel
from llmop_contract.api.v1alpha1.data import PreparePhase


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A condition per the Kubernetes API conventions."""

    type: str = Field(max_length=316)
    """Condition type: Created, Running, Restarting, Suspended, Succeeded, Failed, ..."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = Field(max_length=1024)
    """CamelCase reason for the last transition."""
    message: str = Field("", max_length=32768)
    """Human-readable detail."""
    last_transition_time: str
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = Field(None, ge=0)
    """metadata.generation the condition was computed from."""


class JobState(StrEnum):
    PENDING = "Pending"
    PREPARING = "Preparing"
    STARTING = "Starting"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    COMPRESSING = "Compressing"
    SERVING = "Serving"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class StageState(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"


FINISHED_STAGE_STATES = frozenset({StageState.SUCCEEDED, StageState.FAILED})


class JobReason(StrEnum):
    """Reasons of an LLMTrainingJob's conditions (and of the Events posted for their transitions)."""

    JOB_CREATED = "JobCreated"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
    PREPARATION_SUCCEEDED = "PreparationSucceeded"
    PREPARATION_FAILED = "PreparationFailed"
    AWAITING_ADMISSION = "AwaitingAdmission"
    GANG_ADMITTED = "GangAdmitted"
    INSUFFICIENT_CAPACITY = "InsufficientCapacity"
    UNSCHEDULABLE = "Unschedulable"
    GANG_SCHEDULED = "GangScheduled"
    ALL_WORKERS_RUNNING = "AllWorkersRunning"
    WORKER_FAILED = "WorkerFailed"
    WORKER_DISRUPTED = "WorkerDisrupted"
    WORKER_LOST = "WorkerLost"
    NODE_LOST = "NodeLost"  # a worker's node was deleted or is NotReady: a disruption
    PERMANENT_FAILURE = "PermanentFailure"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    TRAINING_SUCCEEDED = "TrainingSucceeded"
    COMPRESSING = "Compressing"
    COMPRESSION_SUCCEEDED = "CompressionSucceeded"
    COMPRESSION_FAILED = "CompressionFailed"
    EXPORTING_ONNX = "ExportingOnnx"
    ONNX_EXPORT_FAILED = "OnnxExportFailed"
    SELECTED = "Selected"
    NONE_ELIGIBLE = "NoneEligible"
    SERVING_DISABLED = "ServingDisabled"
    SERVING_UNAVAILABLE = "ServingUnavailable"
    READY = "Ready"
    STARTING = "Starting"
    ENGINE_CANNOT_LOAD = "EngineCannotLoad"  # serving.engine VLLM and a layout only the built-in engine loads
    # Synced: whether the operator could carry out its last pass (see llmop/planner/errors.py).
    RECONCILED = "Reconciled"
    API_ERROR = "ApiError"  # transient (429, 5xx, timeout): retried with backoff
    CHILD_REJECTED = "ChildRejected"  # the apiserver refused a child (422, 400): the job fails
    FORBIDDEN = "Forbidden"  # the operator may not create or change a child (403): the job fails
    QUOTA_EXCEEDED = "QuotaExceeded"  # a ResourceQuota refused a child (403): retried until it fits
    NAME_CONFLICT = "NameConflict"  # a child's name is held by an object this job does not own
    LEFTOVER_PENDING = "LeftoverPending"  # a child of an earlier job of this name is being removed
    SPEC_UPDATED = "SpecUpdated"  # an edit of a mutable section was taken up (an Event, no condition)
    CHECKPOINT_FALLBACK = "CheckpointFallback"  # resumed past checkpoints that failed verification
    # Elastic gangs (workers.minNodes/maxNodes): a resize restarts the gang at another size.
    GANG_SHRUNK = "GangShrunk"  # too few nodes fit for resizeGraceSeconds: restarted on those that fit
    GANG_GROWN = "GangGrown"  # capacity for more nodes returned: restarted larger after a checkpoint
    # RemoteSynced: whether everything saved so far is in storage.remote.
    UPLOADS_CURRENT = "UploadsCurrent"
    UPLOAD_PENDING = "UploadPending"
    UPLOAD_FAILED = "UploadFailed"
    RESUMED_FROM_REMOTE = "ResumedFromRemote"  # the volume had no checkpoint: restored from storage.remote
    # A pod's container cannot be created: a Secret, ConfigMap or key its env/envFrom/volumes name is missing.
    CONTAINER_CONFIG_ERROR = "ContainerConfigError"
    # The per-stage conditions (stage.llmop.io/<name>) follow the stage's state.
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class StageStatus(ApiModel):
    """One lifecycle stage (prepare, train, compress-*, serve)."""

    name: str = Field(max_length=128)
    """Stage name."""
    state: StageState
    """Stage state."""
    start_time: str | None = None
    """When the stage started."""
    completion_time: str | None = None
    """When the stage finished."""
    message: str | None = Field(None, max_length=4096)
    """Detail, e.g. the failure reason."""
    # Left out of the manifest while empty: only stages that report figures carry the key.
    results: dict[str, float] = Field(default_factory=dict, max_length=64, exclude_if=lambda r: not r)
    """Key figures of the stage (documents kept, perplexity, size ratio, ...)."""
    method: str | None = Field(None, max_length=64)
    """Compression method of a compress stage (Int8WeightOnly, Magnitude, Distillation, ...)."""
    output_path: str | None = Field(None, max_length=1024)
    """Where the stage wrote its model, on the job's volume."""
    output_uri: str | None = Field(None, max_length=2048)
    """Where the stage uploaded its model under storage.remote.uri."""
    retries: int | None = Field(None, ge=0)
    """Failed pods of the stage's Job so far (each retried up to the backoff limit)."""


class PreparePhaseStatus(ApiModel):
    """One phase of a distributed preparation (data.distributed): its Indexed Job and what its pods did."""

    name: PreparePhase
    """The phase."""
    state: StageState
    """Pending until its Job exists, then as the Job."""
    pods: int = Field(ge=1)
    """Pods (completion indexes) of the phase."""
    completed_indexes: str | None = Field(None, max_length=4096)
    """Indexes whose pod succeeded, as the Job reports them ("0-2,5")."""
    failed_indexes: str | None = Field(None, max_length=4096)
    """Indexes that used up their retries (backoffLimitPerIndex)."""
    retries: int = Field(0, ge=0)
    """Failed pods so far, each retried alone."""
    documents_read: int | None = Field(None, ge=0)
    """Documents the phase's finished pods read."""
    documents_kept: int | None = Field(None, ge=0)
    """Documents the phase's finished pods kept."""


class PreparationStatus(ApiModel):
    """A distributed preparation's phases (data.distributed), in order."""

    phase: PreparePhase | None = None
    """The phase running now (unset once every phase succeeded)."""
    phases: list[PreparePhaseStatus] = Field(default_factory=list, max_length=len(PreparePhase))
    """Every phase started so far, in order."""


class Progress(ApiModel):
    """Training progress read from the rank-0 trainer's metrics endpoint."""

    step: int = Field(0, ge=0)
    """Optimiser steps completed."""
    total_steps: int | None = Field(None, ge=0)
    """Steps planned."""
    percent: int = Field(0, ge=0, le=100)
    """step / totalSteps in percent."""
    loss: float | None = None
    """Latest training loss."""
    validation_loss: float | None = None
    """Latest validation loss."""
    validation_step: int | None = Field(None, ge=0)
    """Step at which validationLoss was computed (step may already be past it)."""
    tokens_per_second: float | None = None
    """Recent training throughput over all ranks."""
    summary: str | None = Field(None, max_length=128)
    """Human summary for printer columns, e.g. "420/1000 (42%)"."""
    eta_seconds: int | None = Field(None, ge=0)
    """Estimated seconds to finish training."""
    productive_seconds: float | None = Field(None, ge=0)
    """Seconds spent on training steps the model kept (steps recomputed after a restart count once)."""
    goodput: float | None = Field(None, ge=0, le=1)
    """productiveSeconds over the wall time since startTime: the share of the job's time that trained."""
    checkpoint_seconds: float | None = Field(None, ge=0)
    """Duration of the last checkpoint save."""
    recommended_checkpoint_interval_steps: int | None = Field(None, ge=1)
    """Daly's optimal interval from checkpointSeconds, the step time and an interruption rate of one per
    45,570 GPU-hours (Llama 3's 466 in 54 days on 16,384 GPUs) scaled to this job's GPUs."""
    energy_measured: bool | None = None
    """Whether every rank's devices report energy (NVIDIA NVML, Linux RAPL); false: unavailable, never
    estimated."""
    energy_joules: float | None = Field(None, ge=0)
    """Energy of the job's GPUs (NVML) or CPU packages (RAPL) so far, all ranks and attempts."""
    energy_kwh: float | None = Field(None, ge=0)
    """energyJoules in kWh."""
    joules_per_token: float | None = Field(None, ge=0)
    """energyJoules per trained token."""
    update_time: str | None = None
    """When these figures were read."""


class ServingStatus(ApiModel):
    """Where the served model answers."""

    url: str | None = None
    """In-cluster URL of the completions API."""
    ready: bool = False
    """All serving replicas are ready."""
    ready_replicas: int = Field(0, ge=0)
    """Serving replicas that pass their readiness probe."""
    kind: str | None = Field(None, max_length=64)
    """What serves the model: Deployment or InferenceService."""
    engine: str | None = Field(None, max_length=64)
    """The engine the operator resolved from serving.engine: VLLM or Builtin."""
    model_path: str | None = None
    """Model directory being served."""
    onnx_path: str | None = None
    """ONNX export of the served model (serving.onnxExport), verified with onnxruntime."""


class RemoteStatus(ApiModel):
    """What of the job is in storage.remote (read from the trainer's metrics and termination message)."""

    uri: str = Field(max_length=2048)
    """storage.remote.uri."""
    checkpoint_step: int | None = Field(None, ge=0)
    """Step of the newest checkpoint complete in remote storage."""
    checkpoint_uri: str | None = Field(None, max_length=2048)
    """That checkpoint's directory."""
    pending_uploads: int = Field(0, ge=0)
    """Checkpoints saved on the volume and not yet uploaded."""
    failed_uploads: int = Field(0, ge=0)
    """Upload attempts that failed so far (each retried with backoff)."""
    model_uri: str | None = Field(None, max_length=2048)
    """The job's model there: the trained export, or the compression stage compression.selection picked (as outputModelPath)."""
    update_time: str | None = None
    """When these figures were read."""


class Resize(ApiModel):
    """One resize of an elastic gang."""

    time: str
    """When the operator decided it."""
    from_nodes: int = Field(ge=1)
    """Nodes before."""
    to_nodes: int = Field(ge=1)
    """Nodes after."""
    attempt: int = Field(ge=1)
    """The attempt that runs at the new size."""
    reason: JobReason
    """GangShrunk or GangGrown."""
    message: str = Field("", max_length=1024)
    """Why, in words."""


MAX_RESIZES = 32


class Interruption(ApiModel):
    """One gang restart (a failure, a disruption or a resize) and what it cost."""

    attempt: int = Field(ge=1)
    """The attempt that resumed."""
    reason: JobReason
    """Why the gang restarted (as its Event says)."""
    time: str
    """When the operator saw it and restarted the gang."""
    step_before: int = Field(0, ge=0)
    """The last step read from the interrupted attempt."""
    resumed_from_step: int | None = Field(None, ge=0)
    """The checkpoint step the new attempt resumed from."""
    recomputed_steps: int | None = Field(None, ge=0)
    """stepBefore - resumedFromStep: steps trained again."""
    lost_seconds: float | None = Field(None, ge=0)
    """From the restart until the new attempt was back at stepBefore: restart, resume and recomputed steps."""


MAX_INTERRUPTIONS = 32


class ResumeStatus(ApiModel):
    """How the latest attempt that did not start afresh got its checkpoint (from the trainer's metrics,
    or its termination message when the attempt ended between two scrapes)."""

    attempt: int = Field(ge=1)
    """The attempt that resumed."""
    step: int = Field(0, ge=0)
    """The checkpoint's step (0: every checkpoint failed verification, so it started from scratch)."""
    from_remote: bool = False
    """The volume had no usable checkpoint: it was restored from storage.remote or resumeFrom."""
    fallbacks: int = Field(0, ge=0)
    """Newer checkpoints that failed verification (truncated or corrupt) and were set aside."""


class LLMTrainingJobStatus(ApiModel):
    """Observed state of an LLMTrainingJob."""

    state: JobState | None = None
    """One-word summary for printer columns; conditions carry the detail."""
    conditions: list[Condition] = Field(default_factory=list)
    """Conditions keyed by type."""
    observed_generation: int | None = None
    """metadata.generation last reconciled."""
    start_time: str | None = None
    """When the job was first acknowledged by the operator."""
    completion_time: str | None = None
    """When the job reached Succeeded or Failed."""
    restart_count: int = 0
    """Gang restarts that counted against backoffLimit."""
    disruption_count: int = 0
    """Gang restarts caused by evictions, preemptions or node loss (not counted against backoffLimit)."""
    attempt: int = 0
    """Current gang attempt (0 before the first gang is created)."""
    current_nodes: int | None = Field(None, ge=1)
    """Worker nodes of the current attempt: workers.numNodes, or the size an elastic gang resized to."""
    capacity_short_since: str | None = None
    """Elastic gangs: since when the current attempt's gang has not fitted whole (shrinks after workers.resizeGraceSeconds)."""
    resizes: list[Resize] = Field(default_factory=list, max_length=MAX_RESIZES)
    """Elastic gangs: resizes so far, the newest last (the last 32 kept)."""
    interruptions: list[Interruption] = Field(default_factory=list, max_length=MAX_INTERRUPTIONS)
    """Gang restarts and the time each lost, the newest last (the last 32 kept)."""
    resume: ResumeStatus | None = None
    """The latest resume from a checkpoint: its attempt, step and source (its Events are said once)."""
    stages: list[StageStatus] = Field(default_factory=list)
    """Per-stage state and results."""
    preparation: PreparationStatus | None = None
    """data.distributed: each preparation phase's pods and documents."""
    progress: Progress | None = None
    """Training progress."""
    output_model_path: str | None = None
    """Model directory chosen as the job's output."""
    selected_stage: str | None = None
    """Compression stage picked by compression.selection (unset: the trained model is the output)."""
    serving: ServingStatus | None = None
    """Serving endpoint."""
    remote: RemoteStatus | None = None
    """Uploads to storage.remote."""
