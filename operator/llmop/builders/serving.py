"""Serving hand-off: a Deployment + Service (or a KServe InferenceService) running `llmtrain serve`."""

from __future__ import annotations

from typing import Any

from llmop import naming
from llmop.builders import JobRef, Manifest, storage, workers
from llmop_contract.api.v1alpha1.lifecycle import ServingSpec

KSERVE_API = "serving.kserve.io/v1beta1"


def _spec(job: JobRef) -> ServingSpec:
    assert job.spec.serving is not None, "serving builders run only for jobs that ask for serving"
    return job.spec.serving


def _resources(job: JobRef) -> Manifest:
    res = _spec(job).resources
    out: Manifest = {}
    if res.requests:
        out["requests"] = {k: str(v) for k, v in res.requests.items()}
    if res.limits:
        out["limits"] = {k: str(v) for k, v in res.limits.items()}
    return out


def _container(job: JobRef, model_path: str) -> Manifest:
    s = _spec(job)
    worker = workers.build_worker(job, 0, attempt=0)["spec"]["containers"][0]
    probe: dict[str, Any] = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5}
    return {
        "name": "serve",
        "image": worker["image"],
        "imagePullPolicy": worker["imagePullPolicy"],
        "command": ["llmtrain"],
        "args": [
            "serve",
            "--model-dir",
            model_path,
            # The pod IP, not a wildcard: the server listens where the Service sends traffic.
            "--host",
            "$(POD_IP)",
            "--port",
            str(s.port),
            "--max-batch-size",
            str(s.max_batch_size),
            "--model-name",
            job.name,
        ],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "HOME", "value": "/tmp"},
            *({"name": e.name, "value": e.value} for e in job.spec.workers.env),
        ],
        "ports": [{"name": "http", "containerPort": s.port}],
        "resources": _resources(job),
        # Loading a model takes a while: traffic only once /readyz says the warm-up generation ran,
        # and liveness only after startup, so a slow load is not mistaken for a hang.
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 60,
        },
        "readinessProbe": probe,
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
        # Leave the Service's endpoints before SIGTERM starts the drain (llmtrain serve's default
        # --drain-timeout is 25 s: 5 + 25 fits the grace period below).
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
        "volumeMounts": storage.volume_mounts(),
        "securityContext": worker["securityContext"],
    }


def _pod_spec(job: JobRef, model_path: str) -> Manifest:
    worker = workers.build_worker(job, 0, attempt=0)["spec"]
    spec: Manifest = {
        k: v
        for k, v in worker.items()
        if k
        not in ("hostname", "subdomain", "schedulingGates", "schedulerName", "containers", "restartPolicy")
    }
    spec["terminationGracePeriodSeconds"] = 35  # preStop, then in-flight requests drain on SIGTERM
    spec["containers"] = [_container(job, model_path)]
    return spec


def labels(job: JobRef) -> dict[str, str]:
    return naming.common_labels(job.name, naming.ROLE_SERVE)


def build_deployment(job: JobRef, model_path: str) -> Manifest:
    s = _spec(job)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": job.metadata(naming.serving_name(job.name), labels(job)),
        "spec": {
            "replicas": s.replicas,
            "selector": {"matchLabels": naming.selector(job.name, naming.ROLE_SERVE)},
            # Never fewer ready replicas than asked for while a new model rolls out.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels(job)}, "spec": _pod_spec(job, model_path)},
        },
    }


def build_service(job: JobRef) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": job.metadata(naming.serving_name(job.name), labels(job)),
        "spec": {
            "selector": naming.selector(job.name, naming.ROLE_SERVE),
            "ports": [{"name": "http", "port": _spec(job).port, "targetPort": "http"}],
        },
    }


def build_inference_service(job: JobRef, model_path: str) -> Manifest:
    """KServe's custom-container predictor: same image, command and volume as the Deployment."""
    s = _spec(job)
    pod = _pod_spec(job, model_path)
    container = pod.pop("containers")[0]
    # KServe routes to the container's first port and runs its own probes on the queue proxy.
    for key in ("startupProbe", "livenessProbe"):
        container.pop(key, None)
    container["name"] = "kserve-container"
    container.pop("lifecycle", None)
    # KServe's queue-proxy sidecar (serverless mode) dials the server on loopback.
    container["args"] = [*container["args"], "--host", "127.0.0.1"]
    predictor: Manifest = {
        **{k: v for k, v in pod.items() if k != "terminationGracePeriodSeconds"},
        "minReplicas": s.replicas,
        "maxReplicas": max(s.replicas, 1),
        "containers": [container],
    }
    return {
        "apiVersion": KSERVE_API,
        "kind": "InferenceService",
        "metadata": job.metadata(naming.serving_name(job.name), labels(job)),
        "spec": {"predictor": predictor},
    }


def build(job: JobRef, model_path: str) -> list[Manifest]:
    """What serving needs, in creation order."""
    if _spec(job).kserve:
        return [build_inference_service(job, model_path)]
    return [build_deployment(job, model_path), build_service(job)]
