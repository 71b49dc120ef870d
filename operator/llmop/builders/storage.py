"""The job's shared volume: prepared data, checkpoints and exported models."""

from __future__ import annotations

from llmop import naming
from llmop.builders import JobRef, Manifest

DATA_DIR = f"{naming.STORAGE_MOUNT}/data"
CHECKPOINT_DIR = f"{naming.STORAGE_MOUNT}/checkpoints"
OUTPUT_DIR = f"{naming.STORAGE_MOUNT}/output"


def claim_name(job: JobRef) -> str:
    return job.spec.storage.claim_name or naming.claim_name(job.name)


def build_claim(job: JobRef) -> Manifest | None:
    """The PersistentVolumeClaim the operator owns, or None when the user brings one."""
    storage = job.spec.storage
    if storage.claim_name:
        return None
    spec: Manifest = {
        "accessModes": [storage.access_mode],
        "resources": {"requests": {"storage": str(storage.size)}},
    }
    if storage.storage_class_name:
        spec["storageClassName"] = storage.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": job.metadata(naming.claim_name(job.name), naming.common_labels(job.name)),
        "spec": spec,
    }


def volumes(job: JobRef) -> list[Manifest]:
    return [
        {"name": "storage", "persistentVolumeClaim": {"claimName": claim_name(job)}},
        {"name": "config", "configMap": {"name": naming.config_map_name(job.name)}},
        # The root filesystem is read-only; these are the only other writable places.
        {"name": "tmp", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
    ]


def volume_mounts() -> list[Manifest]:
    return [
        {"name": "storage", "mountPath": naming.STORAGE_MOUNT},
        {"name": "config", "mountPath": naming.CONFIG_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
