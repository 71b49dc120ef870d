"""The data-preparation batch Job that must succeed before the training gang starts."""

from __future__ import annotations

from llmop import naming
from llmop.builders import JobRef, Manifest, storage, workers


def build_prepare_job(job: JobRef) -> Manifest:
    # Same image, identity, volumes and hardening as a worker; no GPUs, the node's CPU instead.
    worker = workers.build_worker(job, 0, attempt=0)
    container = worker["spec"]["containers"][0]
    container["name"] = "prepare"
    container["args"] = ["prepare", f"{naming.CONFIG_MOUNT}/{naming.CONFIG_FILE}"]
    container["env"] = [{"name": "HOME", "value": "/tmp"}, {"name": "LLMOP_JOB_NAME", "value": job.name}]
    container.pop("ports", None)
    requests = {
        k: str(v) for k, v in job.spec.workers.resources_per_node.requests.items() if k != "nvidia.com/gpu"
    }
    container["resources"] = {"requests": requests} if requests else {}
    pod_spec = {
        k: v
        for k, v in worker["spec"].items()
        if k not in ("hostname", "subdomain", "schedulingGates", "schedulerName", "priorityClassName")
    }
    pod_spec["restartPolicy"] = "Never"
    pod_spec["volumes"] = storage.volumes(job)
    labels = naming.common_labels(job.name, naming.ROLE_PREPARE)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job.metadata(naming.prepare_job_name(job.name), labels),
        "spec": {
            "backoffLimit": job.spec.run_policy.backoff_limit,
            # Preparation is idempotent (a re-run finds the manifest and exits), so retries are safe.
            "podFailurePolicy": {
                "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
            },
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
