"""Reads the observed state of a job's children into small immutable views."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmop import naming
from llmop_contract.protocol import ExitCode


def controller_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The object's controller owner reference (a manifest, or a client's snake_case dict)."""
    meta = obj.get("metadata") or {}
    refs = meta.get("ownerReferences") or meta.get("owner_references") or []
    return next((r for r in refs if r.get("controller")), None)


def controller_uid(obj: Mapping[str, Any]) -> str:
    """UID of the object's controller owner ("" when none): a child is used only when this is the
    job's own UID, so leftovers of an earlier job of the same name are never mistaken for ours."""
    ref = controller_of(obj)
    return str(ref.get("uid", "")) if ref else ""


def controller_name(obj: Mapping[str, Any]) -> str:
    """The object's controller owner as Kind/name ("" when none)."""
    ref = controller_of(obj)
    return f"{ref.get('kind')}/{ref.get('name')}" if ref else ""


# The kubelet's waiting reason for a container whose env or volumes name a missing Secret/ConfigMap/key.
CONFIG_ERROR = "CreateContainerConfigError"

_DISRUPTION_CONDITIONS = {"DisruptionTarget", naming.KUEUE_TERMINATION_TARGET}

# Pod failure reasons that are the platform's doing, not the training code's.
_DISRUPTION_REASONS = {
    "Evicted",
    "Preempted",
    "NodeLost",
    "Shutdown",
    "NodeShutdown",
    "Terminated",
    "DeadlineExceeded",
}


@dataclass(frozen=True)
class PodView:
    name: str
    index: int
    attempt: int
    phase: str
    ready: bool
    deleting: bool
    gated: bool
    gates: tuple[str, ...]
    node: str | None
    ip: str | None
    exit_code: int | None
    reason: str
    message: str
    disrupted: bool
    unschedulable: str | None
    gpus: int
    termination_message: str = ""  # the container's last words (see llmtrain/termination.py)
    stage: str = ""  # compression stage of a compression pod
    owner_uid: str = ""  # the controller owner's UID: the job (workers) or a batch Job (compression)
    owner: str = ""  # the controller owner's "Kind/name"
    uid: str = ""
    waiting_reason: str = ""  # why a container is not started yet (CreateContainerConfigError, ...)
    waiting_message: str = ""  # the kubelet's words, e.g. secret "s3-keys" not found
    prepare_phase: str = ""  # data.distributed: the preparation phase of the pod's Indexed Job
    completion_index: int | None = None  # an Indexed Job's pod: its index

    @property
    def config_error(self) -> str | None:
        """The kubelet's message when a Secret, ConfigMap or key the pod refers to is missing."""
        if self.waiting_reason != CONFIG_ERROR:
            return None
        return self.waiting_message or self.waiting_reason

    @property
    def failed(self) -> bool:
        return self.phase == "Failed"

    @property
    def succeeded(self) -> bool:
        return self.phase == "Succeeded"

    @property
    def live(self) -> bool:
        """Pending or Running: the pod holds (or waits for) its node."""
        return self.phase in ("Pending", "Running")

    @property
    def running(self) -> bool:
        return self.phase == "Running" and not self.deleting


def _int(value: Any, default: int = -1) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def pod_view(pod: Mapping[str, Any]) -> PodView:
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    status = pod.get("status", {})
    labels = meta.get("labels", {})
    conditions = status.get("conditions") or []
    terminated = [
        cs["state"]["terminated"]
        for cs in status.get("containerStatuses") or []
        if (cs.get("state") or {}).get("terminated")
    ]
    message = next((t["message"] for t in terminated if t.get("message")), "")
    waiting: Mapping[str, Any] = next(
        (
            cs["state"]["waiting"]
            for cs in status.get("containerStatuses") or []
            if (cs.get("state") or {}).get("waiting")
        ),
        {},
    )
    exit_code = next((t.get("exitCode") for t in terminated if t.get("exitCode")), None)
    if exit_code is None and terminated:
        exit_code = terminated[0].get("exitCode")
    reason = status.get("reason") or next((t.get("reason", "") for t in terminated if t.get("exitCode")), "")
    disrupted = (
        # The kubelet's and the eviction API's DisruptionTarget, or Kueue's TerminationTarget on the
        # pods of a pod group it preempts or evicts: the platform's doing either way.
        any(c.get("type") in _DISRUPTION_CONDITIONS and c.get("status") == "True" for c in conditions)
        or reason in _DISRUPTION_REASONS
        or exit_code == ExitCode.PREEMPTED
    )
    scheduled = next((c for c in conditions if c.get("type") == "PodScheduled"), None)
    unschedulable = (
        scheduled.get("message", "")
        if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable"
        else None
    )
    gpus = sum(
        _int(((c.get("resources") or {}).get("requests") or {}).get("nvidia.com/gpu"), 0)
        for c in spec.get("containers", [])
    )
    return PodView(
        name=meta.get("name", ""),
        index=_int(labels.get(naming.INDEX_LABEL)),
        attempt=_int(labels.get(naming.ATTEMPT_LABEL)),
        phase=status.get("phase") or "Pending",
        ready=any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions),
        deleting=bool(meta.get("deletionTimestamp")),
        gated=bool(spec.get("schedulingGates")),
        gates=tuple(g.get("name", "") for g in spec.get("schedulingGates") or []),
        node=spec.get("nodeName"),
        ip=status.get("podIP"),
        exit_code=exit_code,
        reason=reason,
        message=status.get("message", ""),
        disrupted=disrupted,
        unschedulable=unschedulable,
        gpus=gpus,
        termination_message=message,
        stage=labels.get(naming.STAGE_LABEL, ""),
        owner_uid=controller_uid(pod),
        owner=controller_name(pod),
        uid=meta.get("uid", ""),
        waiting_reason=str(waiting.get("reason") or ""),
        waiting_message=str(waiting.get("message") or "")[:1024],
        prepare_phase=labels.get(naming.PHASE_LABEL, ""),
        completion_index=_index(labels, meta.get("annotations") or {}),
    )


def _index(labels: Mapping[str, Any], annotations: Mapping[str, Any]) -> int | None:
    value = labels.get(naming.COMPLETION_INDEX, annotations.get(naming.COMPLETION_INDEX))
    return None if value is None else _int(value, -1)


@dataclass(frozen=True)
class ServingView:
    """The serving Deployment (or KServe InferenceService) of a job."""

    kind: str
    replicas: int
    ready_replicas: int
    ready: bool
    url: str | None = None  # KServe reports its own
    owner_uid: str = ""


def deployment_view(obj: Mapping[str, Any]) -> ServingView:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    replicas, ready = spec.get("replicas", 1), status.get("readyReplicas") or 0
    current = status.get("observedGeneration", 0) >= obj.get("metadata", {}).get("generation", 0)
    updated = (status.get("updatedReplicas") or 0) >= replicas
    ok = current and updated and ready >= replicas > 0
    return ServingView("Deployment", replicas, ready, ok, owner_uid=controller_uid(obj))


def inference_service_view(obj: Mapping[str, Any]) -> ServingView:
    status = obj.get("status") or {}
    conditions = status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    replicas = (obj.get("spec") or {}).get("predictor", {}).get("minReplicas", 1)
    return ServingView(
        "InferenceService", replicas, replicas if ready else 0, ready, status.get("url"), controller_uid(obj)
    )


@dataclass(frozen=True)
class BatchJobView:
    """A batch Job the operator created (data preparation, compression)."""

    name: str
    succeeded: bool
    failed: bool
    message: str
    active: int
    failures: int = 0  # pods that failed (each a retry, up to the Job's backoffLimit)
    stage: str = ""
    uid: str = ""
    owner_uid: str = ""
    prepare_phase: str = ""  # data.distributed: the preparation phase this Indexed Job runs
    completed_indexes: str = ""  # an Indexed Job's finished indexes ("0-2,5")
    failed_indexes: str = ""  # ... and those out of retries


def batch_job_view(job: Mapping[str, Any]) -> BatchJobView:
    status = job.get("status", {})
    conditions = status.get("conditions") or []

    def true(type_: str) -> Mapping[str, Any] | None:
        return next((c for c in conditions if c.get("type") == type_ and c.get("status") == "True"), None)

    failed = true("Failed")
    return BatchJobView(
        name=job.get("metadata", {}).get("name", ""),
        succeeded=true("Complete") is not None,
        failed=failed is not None,
        message=(failed or {}).get("message", "") if failed else "",
        active=status.get("active") or 0,
        failures=status.get("failed") or 0,
        stage=job.get("metadata", {}).get("labels", {}).get(naming.STAGE_LABEL, ""),
        uid=job.get("metadata", {}).get("uid", ""),
        owner_uid=controller_uid(job),
        prepare_phase=job.get("metadata", {}).get("labels", {}).get(naming.PHASE_LABEL, ""),
        completed_indexes=str(status.get("completedIndexes") or ""),
        failed_indexes=str(status.get("failedIndexes") or ""),
    )
