"""Serving hand-off: a Deployment + Service (or a KServe InferenceService) running the engine the
planner chose: `llmtrain serve` (Builtin) or vLLM's OpenAI server (VLLM)."""

from __future__ import annotations

from llmop import naming
from llmop.builders import JobRef, Manifest, pod
from llmop_contract.api.v1alpha1.lifecycle import ServingEngine, ServingSpec, VllmSettings
from llmop_contract.api.v1alpha1.workload import Stage

KSERVE_API = "serving.kserve.io/v1beta1"
# preStop, then in-flight requests drain on SIGTERM (llmtrain serve's default --drain-timeout is
# 25 s: 5 + 25 fits).
GRACE_SECONDS = 35
PRE_STOP_SECONDS = 5
# vLLM loads the weights, profiles memory and captures CUDA graphs before /health answers: a few
# minutes for a large model, so the startup probe allows 10 (120 x 5 s).
VLLM_STARTUP_FAILURES = 120
KSERVE_HF_FORMAT = "huggingface"


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


def vllm_settings(job: JobRef) -> VllmSettings:
    return _spec(job).vllm or VllmSettings()


def vllm_engine_args(job: JobRef) -> list[str]:
    """vLLM's engine arguments the spec decides, in the `--flag value` form both `vllm serve` and
    KServe's Hugging Face runtime parse.

    No --chat-template: vLLM applies the tokenizer's own (tokenizer_config.json's chat_template,
    copied into every exported and compressed model), as the built-in engine does. No --quantization
    either: the layouts vLLM is given are plain safetensors (docs/serving-engines.md).
    """
    v = vllm_settings(job)
    args = [
        # The name clients pass as "model": the same one `llmtrain serve --model-name` answers to.
        "--served-model-name",
        job.name,
        # One pod's GPUs hold one copy of the model, split across them.
        "--tensor-parallel-size",
        str(max(_spec(job).gpus_per_pod(), 1)),
        "--gpu-memory-utilization",
        str(v.gpu_memory_utilization),
        "--dtype",
        v.dtype.value,
    ]
    if v.max_model_len is not None:
        args += ["--max-model-len", str(v.max_model_len)]
    return args


def _vllm_env() -> list[Manifest]:
    """Caches on the writable tmp volume, no hub lookups (the model is a local directory), no usage
    reports dialled out of the cluster."""
    return [
        *pod.cache_env(),
        pod.var("XDG_CACHE_HOME", f"{pod.HOME}/.cache"),
        pod.var("HF_HUB_OFFLINE", "1"),
        pod.var("VLLM_NO_USAGE_STATS", "1"),
        pod.var("DO_NOT_TRACK", "1"),
    ]


def _vllm_container(job: JobRef, name: str, model_path: str, host: str) -> Manifest:
    """vLLM's OpenAI server on the serving pod's base container: the same volumes (the model is on
    the job's volume at the same path), /dev/shm (tensor parallelism shares memory across its
    processes), the user's environment and hardening; only the image and command are vLLM's."""
    s = _spec(job)
    env = [pod.field_var("POD_IP", "status.podIP"), *_vllm_env()]
    resources = pod.resources(s.resources.requests, s.resources.limits)
    args = [
        "serve",
        model_path,
        "--host",
        host,
        "--port",
        str(s.port),
        *vllm_engine_args(job),
        *vllm_settings(job).extra_args,
    ]
    main = pod.container(job, Stage.SERVE, name, args, env, resources)
    main["image"] = vllm_settings(job).image
    main["command"] = ["vllm"]
    # vLLM serves /metrics on its API port: the port name is the one the PodMonitor scrapes for
    # both engines.
    main["ports"] = [{"name": "http", "containerPort": s.port}]
    return main


def _vllm_serve_container(job: JobRef, model_path: str) -> Manifest:
    main = _vllm_container(job, "serve", model_path, "$(POD_IP)")
    # /health answers once the engine is up; vLLM has no separate readiness endpoint.
    main["readinessProbe"] = _http_probe("/health", 5)
    main["startupProbe"] = {**_http_probe("/health", 5), "failureThreshold": VLLM_STARTUP_FAILURES}
    main["livenessProbe"] = _http_probe("/health", 10)
    main["lifecycle"] = {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}}
    return main


def labels(job: JobRef) -> dict[str, str]:
    return naming.common_labels(job.name, naming.ROLE_SERVE)


def build_deployment(job: JobRef, model_path: str, engine: ServingEngine = ServingEngine.BUILTIN) -> Manifest:
    s = _spec(job)
    if engine == ServingEngine.VLLM:
        main = _vllm_serve_container(job, model_path)
    else:
        main = _serve_container(job, model_path)
    pod_spec = {
        **pod.pod_spec(job, Stage.SERVE, main),
        "terminationGracePeriodSeconds": GRACE_SECONDS,
    }
    template_labels = labels(job)
    if queue := job.spec.scheduling.kueue_queue:
        # Kueue's Deployment integration: each serving pod is admitted as a serving workload. The
        # label is on the pod template too (Kueue's webhook would copy it there), so the template
        # this operator applies is the one that runs and an apply never rolls the pods.
        template_labels[naming.KUEUE_QUEUE_LABEL] = queue
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": job.metadata(naming.serving_name(job.name), template_labels),
        "spec": {
            "replicas": s.replicas,
            "selector": {"matchLabels": naming.selector(job.name, naming.ROLE_SERVE)},
            # Never fewer ready replicas than asked for while a new model rolls out.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": template_labels}, "spec": pod_spec},
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


def build_inference_service(
    job: JobRef, model_path: str, engine: ServingEngine = ServingEngine.BUILTIN
) -> Manifest:
    """KServe's custom-container predictor for the built-in engine (same image, command and volume
    as the Deployment); for vLLM, KServe's Hugging Face runtime with its vLLM backend.

    KServe routes to the container's first port and runs its own probes on the queue proxy, so the
    container has no startup or liveness probe and no preStop; its queue-proxy sidecar (serverless
    mode) dials the server on loopback.
    """
    s = _spec(job)
    if engine == ServingEngine.VLLM:
        predictor = _hf_runtime_predictor(job, model_path)
    else:
        main = _server(job, "kserve-container", model_path, ["--host", "127.0.0.1"])
        predictor = pod.pod_spec(job, Stage.SERVE, main)
    predictor.update({"minReplicas": s.replicas, "maxReplicas": max(s.replicas, 1)})
    return {
        "apiVersion": KSERVE_API,
        "kind": "InferenceService",
        "metadata": job.metadata(naming.serving_name(job.name), labels(job)),
        "spec": {"predictor": predictor},
    }


def _hf_runtime_predictor(job: JobRef, model_path: str) -> Manifest:
    """The predictor's pod (volumes, identity, placement) with a `model` of format huggingface: the
    runtime's image and port are KServe's; the model directory, the served name and vLLM's engine
    arguments are ours (the runtime hands the arguments it does not know to vLLM)."""
    spec = pod.pod_spec(job, Stage.SERVE, _vllm_container(job, "kserve-container", model_path, "127.0.0.1"))
    main = spec.pop("containers")[0]
    model: Manifest = {
        "modelFormat": {"name": KSERVE_HF_FORMAT},
        "args": [
            f"--model_name={job.name}",
            f"--model_dir={model_path}",
            "--backend=vllm",
            *vllm_engine_args(job),
            *vllm_settings(job).extra_args,
        ],
        **{k: main[k] for k in ("env", "resources", "volumeMounts", "securityContext")},
    }
    if "envFrom" in main:
        model["envFrom"] = main["envFrom"]
    return {**spec, "model": model}


def build(job: JobRef, model_path: str, engine: ServingEngine = ServingEngine.BUILTIN) -> list[Manifest]:
    """What serving needs, in creation order."""
    if _spec(job).kserve:
        return [build_inference_service(job, model_path, engine)]
    return [build_deployment(job, model_path, engine), build_service(job)]
