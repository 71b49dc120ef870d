"""The serving engines on the real cluster: the vLLM Deployment as rendered passes kubeconform
(strict, offline schemas from this apiserver) and, applied by the operator, kwok schedules and runs
its pod behind the Service; with the engine unset a quantised selection is served by the built-in
engine; the apiserver refuses vLLM without GPUs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmop.builders import JobRef
from llmop.builders.serving import build
from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.lifecycle import DEFAULT_VLLM_IMAGE, ServingEngine
from llmop_dev import cluster as devcluster
from tests.cluster.conftest import Jobs, OperatorProcess
from tests.helm import k8s_schemas
from tests.helm.chart import Tools
from tests.helm.chart import kubeconform as kubeconform_report
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster

MODEL = "/var/lib/llmop/output/model"
# What kwok's worker and compression pods end with, as `llmtrain` would.
MESSAGE = {
    "step": 100,
    "totalSteps": 100,
    "modelPath": MODEL,
    "results": {"sizeBytes": 1000.0, "sizeRatio": 0.27, "perplexityIncreasePercent": 1.2},
}
GPU_SERVING = {"limits": {"nvidia.com/gpu": "2", "cpu": "1", "memory": "2Gi"}}


def kubeconform(cluster: Cluster, out: Path, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """kubeconform -strict over ``manifests``, with schemas made from this apiserver's OpenAPI."""
    openapi = json.loads(cluster.kubectl("get", "--raw", "/openapi/v2").stdout)
    kinds = {(m["apiVersion"], m["kind"]) for m in manifests}
    assert k8s_schemas.from_openapi_v2(openapi, kinds, out)
    return kubeconform_report(Tools(devcluster.ensure_binaries()), out, yaml.safe_dump_all(manifests))


def vllm_spec() -> LLMTrainingJobSpec:
    return LLMTrainingJobSpec.model_validate(
        {
            "data": {"prepare": False},
            "training": {"maxSteps": 10, "globalBatchSize": 2, "microBatchSize": 1},
            "workers": {"numNodes": 1, "procsPerNode": 1, "gpusPerNode": 1},
            "serving": {
                "enabled": True,
                "engine": "VLLM",
                "resources": GPU_SERVING,
                "vllm": {"maxModelLen": 2048, "dtype": "bfloat16", "extraArgs": ["--max-num-seqs", "64"]},
            },
        }
    )


def test_rendered_vllm_deployment_passes_kubeconform_strict(cluster: Cluster, tmp_path: Path) -> None:
    manifests = build(JobRef("chat", "ns", "uid", vllm_spec()), MODEL, ServingEngine.VLLM)
    assert [m["kind"] for m in manifests] == ["Deployment", "Service"]
    report = kubeconform(cluster, tmp_path, manifests)
    assert report["summary"] == {"valid": 2, "invalid": 0, "errors": 0, "skipped": 0}, report["resources"]
    # The same schemas catch a misspelt field of the vLLM container, or the check above says nothing.
    typo = copy.deepcopy(manifests[0])
    typo["spec"]["template"]["spec"]["containers"][0]["startupProbes"] = {"periodSeconds": 1}
    report = kubeconform(cluster, tmp_path, [typo])
    assert report["summary"]["invalid"] == 1 and "startupProbes" in json.dumps(report["resources"])


def serving_pods(cluster: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    selector = f"llmop.io/job-name={name},llmop.io/role=serve"
    return list(cluster.kubectl_json("get", "pods", "-n", ns, "-l", selector)["items"])


def running_serving_pod(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        pods = [
            p
            for p in serving_pods(cluster, ns, name)
            if p["status"].get("phase") == "Running" and p["spec"].get("nodeName")
        ]
        return pods[0] if len(pods) == 1 else None

    return dict(wait_for(check, timeout=90, what=f"{name}'s serving pod scheduled and Running"))


def train_to_success(jobs: Jobs, name: str, **spec: Any) -> None:
    jobs.create(
        name,
        workers={
            "numNodes": 1,
            "procsPerNode": 1,
            "gpusPerNode": 1,
            "podAnnotations": {"llmop.io/kwok-termination-message": json.dumps(MESSAGE)},
        },
        training={"maxSteps": 100, "globalBatchSize": 2, "microBatchSize": 1},
        **spec,
    )
    jobs.wait_pods(name, 1, timeout=90)
    jobs.annotate_pods(name, {"llmop.io/kwok-exit-after": "1s"})
    jobs.wait_condition(name, "Succeeded", timeout=120)


def test_a_vllm_job_is_served_by_a_vllm_pod_behind_its_service(
    jobs: Jobs, operator: OperatorProcess, cluster: Cluster, tmp_path: Path
) -> None:
    ns = jobs.ns
    serving = vllm_spec().serving
    assert serving is not None
    train_to_success(jobs, "vl", serving=serving.to_wire())

    pod = running_serving_pod(cluster, ns, "vl")
    container = pod["spec"]["containers"][0]
    assert container["image"] == DEFAULT_VLLM_IMAGE and container["command"] == ["vllm"]
    args = container["args"]
    assert args[:2] == ["serve", MODEL]
    assert args[args.index("--served-model-name") + 1] == "vl"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[-2:] == ["--max-num-seqs", "64"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    node = cluster.kubectl_json("get", "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"

    # The status names the engine, and the job is Serving once kwok reports the pod ready.
    ready = jobs.wait_condition("vl", "Serving", timeout=90)
    assert ready["reason"] == "Ready"
    status = jobs.status("vl")
    assert status["serving"]["engine"] == "VLLM" and status["state"] == "Serving"
    assert status["serving"]["url"] == f"http://vl-serve.{ns}.svc:8000/v1"
    wide = cluster.kubectl("get", "llmtrainingjob", "vl", "-n", ns, "-o", "wide").stdout
    assert "ENGINE" in wide.splitlines()[0] and "VLLM" in wide.splitlines()[1], wide

    # The Service sends its traffic to that pod, on the port vLLM listens on. (This cluster's pod
    # IPs are loopback addresses, which no EndpointSlice may hold, so the Service's selection is
    # read from its selector and the pod, as the EndpointSlice controller would.)
    service = cluster.kubectl_json("get", "service", "vl-serve", "-n", ns)
    selector = service["spec"]["selector"]
    selected = cluster.kubectl_json(
        "get", "pods", "-n", ns, "-l", ",".join(f"{k}={v}" for k, v in selector.items())
    )["items"]
    assert [p["metadata"]["name"] for p in selected] == [pod["metadata"]["name"]]
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8000 and port["targetPort"] == "http"
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    assert args[args.index("--port") + 1] == "8000"

    # What the operator applied is what the builder renders for this job, and it is schema-valid.
    job = jobs.get("vl")
    ref = JobRef("vl", ns, job["metadata"]["uid"], LLMTrainingJobSpec.model_validate(job["spec"]))
    rendered = build(ref, MODEL, ServingEngine.VLLM)
    assert rendered[0]["spec"]["template"]["spec"]["containers"][0]["args"] == args
    report = kubeconform(cluster, tmp_path, rendered)
    assert report["summary"] == {"valid": 2, "invalid": 0, "errors": 0, "skipped": 0}, report["resources"]
    print(
        f"\n{pod['metadata']['name']} Running on {pod['spec']['nodeName']}: vllm {' '.join(args)}"
        f"\nstatus.serving: {json.dumps(status['serving'])}\nkubeconform -strict: {report['summary']}"
    )


def test_unset_engine_with_a_quantised_selection_is_served_by_the_builtin_engine(
    jobs: Jobs, operator: OperatorProcess, cluster: Cluster
) -> None:
    train_to_success(
        jobs,
        "qz",
        compression={"quantization": [{"method": "Int8Dynamic"}], "selection": {"objective": "Smallest"}},
        # GPUs asked for, which alone would pick vLLM: the quantised layout is the built-in engine's.
        serving={"enabled": True, "resources": GPU_SERVING},
    )
    assert jobs.status("qz")["selectedStage"] == "quantize-0"
    pod = running_serving_pod(cluster, jobs.ns, "qz")
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["llmtrain"] and container["args"][0] == "serve"
    status = wait_for(
        lambda: (s := jobs.status("qz")).get("serving") and s, timeout=60, what="qz's serving status"
    )
    assert status["serving"]["engine"] == "Builtin"


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        (
            {"enabled": True, "engine": "VLLM", "resources": {"limits": {"cpu": "2"}}},
            "serving.engine VLLM needs GPUs: set serving.resources.limits nvidia.com/gpu",
        ),
        (
            {"enabled": True, "engine": "Builtin", "vllm": {"maxModelLen": 512}},
            "serving.vllm applies only with serving.engine VLLM or unset",
        ),
        (
            {"enabled": True, "vllm": {"gpuMemoryUtilization": 1.5}},
            "spec.serving.vllm.gpuMemoryUtilization",
        ),
    ],
    ids=["vllm-without-gpus", "vllm-settings-with-builtin", "memory-fraction-above-1"],
)
def test_the_apiserver_refuses_a_vllm_spec_that_cannot_run(
    cluster: Cluster, namespace: str, serving: dict[str, Any], message: str
) -> None:
    manifest = {
        "apiVersion": "llmop.io/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": "bad"},
        "spec": {
            "data": {"prepare": False},
            "training": {"maxSteps": 10, "globalBatchSize": 2, "microBatchSize": 1},
            "workers": {"numNodes": 1, "procsPerNode": 1, "gpusPerNode": 1},
            "serving": serving,
        },
    }
    out = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr
