"""The parts every stage's pod is built from: trainer container, identity, hardening, volumes, placement.

Each stage (workers, prepare, compress, serving) composes its pod from these and adds, explicitly,
what only it needs; no stage starts from another stage's pod and deletes what it should not have.
What a stage gets of the user's spec (env, envFrom, object-store settings, extra volumes, the hub
token, placement, priority) is decided in one place, the ``STAGES`` table below: ``container`` and
``pod_spec`` read it, so a stage builder cannot forget a part (the prepare Job once dropped
``workers.env``) or take one it should not have.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from llmop import naming
from llmop.builders import JobRef, Manifest, storage
from llmop_contract.api.v1alpha1.workload import ExtraVolume, Stage
from llmop_contract.protocol import Env

TRAINER_UID = 1000
HOME = "/tmp"  # the root filesystem is read-only: $HOME and caches live on the tmp volume
CONFIG_PATH = f"{naming.CONFIG_MOUNT}/{naming.CONFIG_FILE}"
# Secret files owned by root, group fsGroup (the trainer's gid): the non-root trainer reads them
# through its group, nobody else can.
SECRET_MODE = 0o440


# --- What each stage gets -------------------------------------------------------------------------


@dataclass(frozen=True)
class StageGets:
    """What a stage's pod takes from the job's spec besides the stage's own part."""

    user_env: bool  # workers.env (values and Secret/ConfigMap keys), last so that it wins
    env_from: bool  # workers.envFrom and storage.objectStore.credentialsSecret
    object_store: bool  # AWS_ENDPOINT_URL_S3 / AWS_DEFAULT_REGION from storage.objectStore
    volumes: bool  # workers.volumes whose stages include this one (ExtraVolume.mounted_in)
    placement: bool  # workers.nodeSelector, tolerations, affinity: every stage on the same nodes
    hub_token: bool  # HF_TOKEN: only the stages that fetch model.pretrained from the hub
    priority: bool  # workers.priorityClassName: the stages that hold accelerators


# Credentials, endpoints and the user's variables reach every pod of the job: a compression or
# serving pod reads the same sources and writes to the same remote storage as training does. The
# hub token goes only where the model is fetched (prepare: its tokenizer, training: its weights);
# later stages read the export on the volume. Preparation is CPU work that must not preempt training.
# fmt: off
STAGES: Final[Mapping[Stage, StageGets]] = {
    #                         user_env env_from object_store volumes placement hub_token priority
    Stage.PREPARE:  StageGets(True,    True,    True,        True,   True,     True,     False),
    Stage.TRAIN:    StageGets(True,    True,    True,        True,   True,     True,     True),
    Stage.COMPRESS: StageGets(True,    True,    True,        True,   True,     False,    True),
    Stage.SERVE:    StageGets(True,    True,    True,        True,   True,     False,    True),
}
# fmt: on


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
    """The hub token from its Secret, for the stages whose ``StageGets.hub_token`` is set.

    An optional key ref would hide a typo until a gated download fails, so the kubelet refuses to
    start the pod instead (CreateContainerConfigError).
    """
    source = job.spec.model.pretrained
    if source is None or source.hub.token_secret is None:
        return []
    ref = source.hub.token_secret
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def object_store_env(job: JobRef) -> list[Manifest]:
    """storage.objectStore's endpoint and region, as botocore (s3fs) reads them.

    The addressing style has no botocore variable: the trainer reads it from its configuration.
    Credentials never pass through here: they come from the Secret (``env_from``), resolved by the
    kubelet.
    """
    store = job.spec.storage.object_store
    out = []
    if store.endpoint:
        out.append(var("AWS_ENDPOINT_URL_S3", store.endpoint))
    if store.region:
        out.append(var("AWS_DEFAULT_REGION", store.region))
    return out


def user_env(job: JobRef) -> list[Manifest]:
    """spec.workers.env, last so that it wins over the operator's variables of the same name."""
    return [e.to_wire() for e in job.spec.workers.env]


def env_from(job: JobRef) -> list[Manifest]:
    """The credentials Secret, then workers.envFrom: of two sources with a key, the later one wins
    (and an ``env`` entry wins over both). Not optional: a missing Secret stops the pod at
    CreateContainerConfigError instead of a run without credentials."""
    out: list[Manifest] = []
    if secret := job.spec.storage.object_store.credentials_secret:
        out.append({"secretRef": {"name": secret}})
    out += [e.to_wire() for e in job.spec.workers.env_from]
    return out


def stage_env(job: JobRef, stage: Stage) -> list[Manifest]:
    """What ``STAGES`` gives a stage's container after its own variables, in this order."""
    gets = STAGES[stage]
    return [
        *(object_store_env(job) if gets.object_store else []),
        *(source_env(job) if gets.hub_token else []),
        *(user_env(job) if gets.user_env else []),
    ]


# --- Extra volumes --------------------------------------------------------------------------------


def extra_volumes(job: JobRef, stage: Stage) -> list[ExtraVolume]:
    if not STAGES[stage].volumes:
        return []
    return [v for v in job.spec.workers.volumes if v.mounted_in(stage)]


def _volume(v: ExtraVolume) -> Manifest:
    if v.persistent_volume_claim is not None:
        claim: Manifest = {"claimName": v.persistent_volume_claim.claim_name}
        if v.read_only:
            claim["readOnly"] = True
        return {"name": v.name, "persistentVolumeClaim": claim}
    if v.config_map is not None:
        return {"name": v.name, "configMap": {"name": v.config_map.name}}
    assert v.secret is not None  # exactly one source (admission)
    return {"name": v.name, "secret": {"secretName": v.secret.secret_name, "defaultMode": SECRET_MODE}}


def _mount(v: ExtraVolume) -> Manifest:
    mount: Manifest = {"name": v.name, "mountPath": v.mount_path, "readOnly": v.read_only}
    if v.sub_path:
        mount["subPath"] = v.sub_path
    return mount


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
    job: JobRef, stage: Stage, name: str, args: list[str], env: Iterable[Manifest], resources: Manifest
) -> Manifest:
    """The trainer image running `llmtrain <args>`, hardened, with the job's volumes mounted.

    ``env`` is the stage's own variables; what ``STAGES`` gives the stage follows them.
    """
    w = job.spec.workers
    out: Manifest = {
        "name": name,
        "image": w.image,
        "imagePullPolicy": w.image_pull_policy,
        "command": ["llmtrain"],
        "args": args,
        "env": [*env, *stage_env(job, stage)],
        "resources": resources,
        "volumeMounts": [*storage.volume_mounts(), *(_mount(v) for v in extra_volumes(job, stage))],
        "securityContext": container_security_context(),
    }
    if STAGES[stage].env_from and (sources := env_from(job)):
        out["envFrom"] = sources
    return out


def pod_spec(job: JobRef, stage: Stage, main: Manifest) -> Manifest:
    """One container under the job's service account (no API token), its volumes and placement."""
    gets = STAGES[stage]
    spec: Manifest = {
        "serviceAccountName": naming.service_account_name(job.name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [main],
        "volumes": [*storage.volumes(job), *(_volume(v) for v in extra_volumes(job, stage))],
    }
    if gets.placement:
        spec.update(placement(job))
    if gets.priority:
        spec.update(priority(job))
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
