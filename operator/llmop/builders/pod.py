"""The parts every stage's pod is built from: trainer container, identity, hardening, volumes, placement.

Each stage (workers, prepare, compress, serving) composes its pod from these and adds, explicitly,
what only it needs; no stage starts from another stage's pod and deletes what it should not have.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from llmop import naming
from llmop.builders import JobRef, Manifest, storage
from llmop_contract.protocol import Env

TRAINER_UID = 1000
HOME = "/tmp"  # the root filesystem is read-only: $HOME and caches live on the tmp volume
CONFIG_PATH = f"{naming.CONFIG_MOUNT}/{naming.CONFIG_FILE}"


# --- Environment ----------------------------------------------------------------------------------


def var(name: str, value: str) -> Manifest:
    return {"name": str(name), "value": value}


def field_var(name: str, field_path: str) -> Manifest:
    """A variable filled in by the downward API, e.g. status.podIP."""
    return {"name": str(name), "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def home_env() -> list[Manifest]:
    return [var("HOME", HOME)]


def cache_env() -> list[Manifest]:
    """$HOME and the caches that default to it (Triton kernels, torch extensions) on a writable volume."""
    return [
        *home_env(),
        var("TRITON_CACHE_DIR", f"{HOME}/triton"),
        var("TORCH_EXTENSIONS_DIR", f"{HOME}/torch_extensions"),
    ]


def identity_env(job: JobRef) -> list[Manifest]:
    """Which job the trainer works for (log lines, metric labels)."""
    return [var(Env.JOB_NAME, job.name), var(Env.JOB_NAMESPACE, job.namespace)]


def source_env(job: JobRef) -> list[Manifest]:
    """What the stages that fetch the pretrained model need: the hub token from its Secret.

    Only prepare (the tokenizer) and the workers (the weights) fetch it; later stages read the
    export on the job's volume. An optional key ref would hide a typo until a gated download
    fails, so the kubelet refuses to start the pod instead (CreateContainerConfigError).
    """
    source = job.spec.model.pretrained
    if source is None or source.hub.token_secret is None:
        return []
    ref = source.hub.token_secret
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def user_env(job: JobRef) -> list[Manifest]:
    """spec.workers.env, last so that it wins over the operator's variables of the same name."""
    return [e.to_wire() for e in job.spec.workers.env]


# --- Resources ------------------------------------------------------------------------------------


def resources(requests: Mapping[str, Any], limits: Mapping[str, Any] | None = None) -> Manifest:
    """A container's resources with quantities as strings; empty sections are left out."""
    out: Manifest = {}
    if requests:
        out["requests"] = {k: str(v) for k, v in requests.items()}
    if limits:
        out["limits"] = {k: str(v) for k, v in limits.items()}
    return out


# --- Container and pod ----------------------------------------------------------------------------


def container_security_context() -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security_context() -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        "fsGroup": TRAINER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container(
    job: JobRef, name: str, args: list[str], env: Iterable[Manifest], resources: Manifest
) -> Manifest:
    """The trainer image running `llmtrain <args>`, hardened, with the job's volumes mounted."""
    w = job.spec.workers
    return {
        "name": name,
        "image": w.image,
        "imagePullPolicy": w.image_pull_policy,
        "command": ["llmtrain"],
        "args": args,
        "env": list(env),
        "resources": resources,
        "volumeMounts": storage.volume_mounts(),
        "securityContext": container_security_context(),
    }


def pod_spec(job: JobRef, main: Manifest) -> Manifest:
    """One container under the job's service account (no API token), its volumes and placement."""
    spec: Manifest = {
        "serviceAccountName": naming.service_account_name(job.name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [main],
        "volumes": storage.volumes(job),
    }
    spec.update(placement(job))
    return spec


def placement(job: JobRef) -> Manifest:
    """spec.workers' node selector, tolerations and affinity: every stage runs on the same nodes."""
    w = job.spec.workers
    out: Manifest = {}
    if w.node_selector:
        out["nodeSelector"] = dict(w.node_selector)
    if w.tolerations:
        out["tolerations"] = [t.to_wire() for t in w.tolerations]
    if w.affinity:
        out["affinity"] = w.affinity
    return out


def priority(job: JobRef) -> Manifest:
    """spec.workers.priorityClassName, for the stages that hold GPUs (not data preparation)."""
    name = job.spec.workers.priority_class_name
    return {"priorityClassName": name} if name else {}


def service_account(job: JobRef) -> Manifest:
    """The trainer's identity: bound to no Role, so a compromised pod can do nothing to the API."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": job.metadata(naming.service_account_name(job.name), naming.common_labels(job.name)),
        "automountServiceAccountToken": False,
    }
