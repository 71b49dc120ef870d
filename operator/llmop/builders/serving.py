"""Serving hand-off: a Deployment + Service (or a KServe InferenceService) running `llmtrain serve`."""

from __future__ import annotations

from llmop import naming
from llmop.builders import JobRef, Manifest, pod
from llmop_contract.api.v1alpha1.lifecycle import ServingSpec
from llmop_contract.api.v1alpha1.workload import Stage

KSERVE_API = "serving.kserve.io/v1beta1"
# preStop, then in-flight requests drain on SIGTERM (llmtrain serve's default --drain-timeout is
# 25 s: 5 + 25 fits).
GRACE_SECONDS = 35
PRE_STOP_SECONDS = 5


def _spec(job: JobRef) -> ServingSpec:
    assert job.spec.serving is not None, "serving builders run only for jobs that ask for serving"
    return job.spec.serving


def _http_probe(path: str, period: int) -> Manifest:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period}


def _server(job: JobRef, name: str, model_path: str, extra_args: list[str]) -> Manifest:
    """`llmtrain serve` in the trainer's image, with its port and its readiness probe."""
    s = _spec(job)
    args = [
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
        *extra_args,
    ]
    # Then pod.STAGES[SERVE] (the user's environment, credentials, volumes), not the trainer's
    # identity or a gang member's.
    env = [pod.field_var("POD_IP", "status.podIP"), *pod.home_env()]
    resources = pod.resources(s.resources.requests, s.resources.limits)
    main = pod.container(job, Stage.SERVE, name, args, env, resources)
    main["ports"] = [{"name": "http", "containerPort": s.port}]
    # Traffic only once /readyz says the warm-up generation ran.
    main["readinessProbe"] = _http_probe("/readyz", 5)
    return main


def _serve_container(job: JobRef, model_path: str) -> Manifest:
    main = _server(job, "serve", model_path, [])
    # Loading a model takes a while: liveness only after startup, so a slow load is not mistaken
    # for a hang.
    main["startupProbe"] = {**_http_probe("/healthz", 5), "failureThreshold": 60}
    main["livenessProbe"] = _http_probe("/healthz", 10)
    # Leave the Service's endpoints before SIGTERM starts the drain.
    main["lifecycle"] = {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}}
    return main


def labels(job: JobRef) -> dict[str, str]:
    return naming.common_labels(job.name, naming.ROLE_SERVE)


def build_deployment(job: JobRef, model_path: str) -> Manifest:
    s = _spec(job)
    pod_spec = {
        **pod.pod_spec(job, Stage.SERVE, _serve_container(job, model_path)),
        "terminationGracePeriodSeconds": GRACE_SECONDS,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": job.metadata(naming.serving_name(job.name), labels(job)),
        "spec": {
            "replicas": s.replicas,
            "selector": {"matchLabels": naming.selector(job.name, naming.ROLE_SERVE)},
            # Never fewer ready replicas than asked for while a new model rolls out.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels(job)}, "spec": pod_spec},
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
    """KServe's custom-container predictor: same image, command and volume as the Deployment.

    KServe routes to the container's first port and runs its own probes on the queue proxy, so the
    container has no startup or liveness probe and no preStop; its queue-proxy sidecar (serverless
    mode) dials the server on loopback.
    """
    s = _spec(job)
    main = _server(job, "kserve-container", model_path, ["--host", "127.0.0.1"])
    predictor: Manifest = {
        **pod.pod_spec(job, Stage.SERVE, main),
        "minReplicas": s.replicas,
        "maxReplicas": max(s.replicas, 1),
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
