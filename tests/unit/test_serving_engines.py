"""Which engine serves a model (planner) and how vLLM is run (builder), planned without a cluster."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from llmop.builders import JobRef
from llmop.builders.serving import build
from llmop.conditions import get
from llmop.observe import ServingView
from llmop.planner import engine
from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.lifecycle import DEFAULT_VLLM_IMAGE, ServingEngine, ServingSpec
from tests.unit.test_planner_stages import job, result_pod, spec, step, trained_pods

GPUS = {"limits": {"nvidia.com/gpu": "2", "cpu": "8"}}
MODEL = "/var/lib/llmop/output/model"
COMPRESSION = {
    "quantization": [{"method": "Int8Dynamic"}],
    "pruning": [{"method": "Structured", "sparsity": 0.25}],
    "selection": {"objective": "Smallest", "maxPerplexityIncreasePercent": 50},
}


def with_serving(compression: dict[str, Any] | None = None, **serving: Any) -> LLMTrainingJobSpec:
    raw = spec(compression).to_wire()
    raw["serving"] = {"enabled": True, **serving}
    return LLMTrainingJobSpec.model_validate(raw)


def finished(s: LLMTrainingJobSpec, smallest: str | None = None) -> dict[str, Any]:
    """Trained; with compression, both stages done and ``smallest`` the smaller (so selected)."""
    status = dict(step(s, {"attempt": 1}, pods=trained_pods()).status)
    if s.compression is None:
        return status
    sizes = {"quantize-0": 300.0, "prune-0": 300.0}
    assert smallest is not None
    sizes[smallest] = 100.0
    done = dict(active=0, succeeded=True)
    return dict(
        step(
            s,
            status,
            compress_jobs=[job(name, **done) for name in sizes],
            compress_pods=[result_pod(name, size, 1.0) for name, size in sizes.items()],
        ).status
    )


def serve(s: LLMTrainingJobSpec, status: dict[str, Any]) -> Any:
    return step(s, status)


@pytest.mark.parametrize(
    ("engine_field", "resources", "expected"),
    [
        (None, GPUS, "VLLM"),  # GPUs asked for: vLLM
        (None, {"requests": {"cpu": "2"}}, "Builtin"),  # CPU only: the built-in engine
        ("Builtin", GPUS, "Builtin"),  # asked for explicitly, even on GPUs
        ("VLLM", {"requests": {"nvidia.com/gpu": "1"}}, "VLLM"),
    ],
)
def test_engine_is_resolved_from_the_spec_and_the_gpus(
    engine_field: str | None, resources: dict[str, Any], expected: str
) -> None:
    fields: dict[str, Any] = {"resources": resources}
    if engine_field:
        fields["engine"] = engine_field
    s = with_serving(**fields)
    p = serve(s, finished(s))
    assert p.serve_model == "/m/model"
    assert p.serve_engine == ServingEngine(expected)
    assert p.status["serving"]["engine"] == expected
    # The manifests the controller applies follow the resolved engine.
    deployment = build(JobRef("j", "ns", "uid", s), MODEL, p.serve_engine)[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == (["vllm"] if expected == "VLLM" else ["llmtrain"])


def test_unset_engine_with_a_quantised_selection_falls_back_to_builtin() -> None:
    s = with_serving(COMPRESSION, resources=GPUS)
    status = finished(s, smallest="quantize-0")
    assert status["selectedStage"] == "quantize-0"
    p = serve(s, status)
    assert p.serve_model == "/m/compressed/quantize-0"
    assert p.serve_engine == ServingEngine.BUILTIN and p.status["serving"]["engine"] == "Builtin"


def test_unset_engine_with_a_pruned_selection_runs_vllm() -> None:
    s = with_serving(COMPRESSION, resources=GPUS)
    p = serve(s, finished(s, smallest="prune-0"))
    assert p.serve_model == "/m/compressed/prune-0" and p.serve_engine == ServingEngine.VLLM


def test_source_trained_serves_the_plain_export_with_vllm_despite_a_quantised_selection() -> None:
    s = with_serving(COMPRESSION, resources=GPUS, source="Trained")
    p = serve(s, finished(s, smallest="quantize-0"))
    assert p.serve_model == "/m/model" and p.serve_engine == ServingEngine.VLLM


def test_explicit_vllm_on_a_quantised_layout_is_refused_with_a_condition_naming_it() -> None:
    s = with_serving(COMPRESSION, resources=GPUS, engine="VLLM")
    status = finished(s, smallest="quantize-0")
    p = serve(s, status)
    assert p.serve_model is None and "serving" not in p.status
    condition = get(p.status["conditions"], "Serving")
    assert condition is not None and condition["status"] == "False"
    assert condition["reason"] == "EngineCannotLoad"
    assert "'quantized' layout" in condition["message"] and "quantize-0" in condition["message"]
    # Switched to VLLM while the built-in engine served it: that Deployment goes.
    served = dict(status, serving={"kind": "Deployment", "engine": "Builtin"})
    again = step(s, served, serving=ServingView("Deployment", 1, 1, True))
    assert again.remove_serving and again.serve_model is None


@pytest.mark.parametrize(
    ("stage", "layout"),
    [(None, "hf"), ("train", "hf"), ("quantize-0", "quantized"), ("prune-3", "hf"), ("distill", "hf")],
)
def test_layout_of_each_stage(stage: str | None, layout: str) -> None:
    assert engine.layout_of(stage) == layout


def test_api_rules_vllm_needs_gpus_and_vllm_settings_need_that_engine() -> None:
    with pytest.raises(ValidationError, match=re.escape("serving.engine VLLM needs GPUs")):
        ServingSpec.model_validate({"engine": "VLLM", "resources": {"requests": {"cpu": "2"}}})
    with pytest.raises(
        ValidationError, match=re.escape("serving.vllm applies only with serving.engine VLLM or unset")
    ):
        ServingSpec.model_validate({"engine": "Builtin", "vllm": {"maxModelLen": 512}})
    for bad in ({"gpuMemoryUtilization": 0}, {"gpuMemoryUtilization": 1.5}, {"maxModelLen": 0}):
        with pytest.raises(ValidationError):
            ServingSpec.model_validate({"vllm": bad})
    with pytest.raises(ValidationError):
        ServingSpec.model_validate({"vllm": {"dtype": "float32"}})
    ok = ServingSpec.model_validate({"vllm": {}, "resources": GPUS})
    assert (
        ok.vllm is not None and ok.vllm.image == DEFAULT_VLLM_IMAGE and ok.vllm.gpu_memory_utilization == 0.9
    )


def arg(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, (flag, args)
    return args[args.index(flag) + 1]


def vllm_job(**vllm: Any) -> JobRef:
    s = with_serving(resources=GPUS, port=8100, replicas=2, vllm=vllm)
    return JobRef("chat", "ns", "uid", s)


def test_vllm_deployment_runs_the_openai_server_with_the_specs_arguments() -> None:
    ref = vllm_job(maxModelLen=1024, gpuMemoryUtilization=0.8, dtype="bfloat16", extraArgs=["--seed", "7"])
    deployment, service = build(ref, MODEL, ServingEngine.VLLM)
    pod = deployment["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == DEFAULT_VLLM_IMAGE and c["command"] == ["vllm"]
    args = c["args"]
    assert args[:2] == ["serve", MODEL]
    # The name clients ask for is the built-in engine's: the job's name.
    assert arg(args, "--served-model-name") == "chat"
    assert arg(args, "--tensor-parallel-size") == "2"  # GPUs per pod
    assert arg(args, "--max-model-len") == "1024"
    assert arg(args, "--gpu-memory-utilization") == "0.8"
    assert arg(args, "--dtype") == "bfloat16"
    assert arg(args, "--port") == "8100" and arg(args, "--host") == "$(POD_IP)"
    assert args[-2:] == ["--seed", "7"]  # the user's, after the operator's
    assert "--chat-template" not in args  # the tokenizer's own template
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert c["ports"] == [{"name": "http", "containerPort": 8100}]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1" and env["HOME"] == "/tmp"
    # Shared memory for tensor parallelism, and the job's volume where the model is.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory"}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["shm"] == "/dev/shm" and MODEL.startswith(mounts["storage"])
    # The same labels, selector and Service as the built-in engine's.
    builtin, _ = build(ref, MODEL, ServingEngine.BUILTIN)
    assert deployment["spec"]["selector"] == builtin["spec"]["selector"]
    assert pod["volumes"] == builtin["spec"]["template"]["spec"]["volumes"]
    assert c["volumeMounts"] == builtin["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 8100, "targetPort": "http"}]


def test_vllm_defaults_leave_max_model_len_to_the_model() -> None:
    args = build(vllm_job(), MODEL, ServingEngine.VLLM)[0]["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert "--max-model-len" not in args
    assert arg(args, "--gpu-memory-utilization") == "0.9" and arg(args, "--dtype") == "auto"


def test_kserve_makes_the_same_choice_through_its_hugging_face_runtime() -> None:
    s = with_serving(resources=GPUS, kserve=True, vllm={"maxModelLen": 2048})
    ref = JobRef("chat", "ns", "uid", s)
    (isvc,) = build(ref, MODEL, ServingEngine.VLLM)
    predictor = isvc["spec"]["predictor"]
    assert "containers" not in predictor
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "huggingface"}
    assert {"--backend=vllm", "--model_name=chat", f"--model_dir={MODEL}"} <= set(model["args"])
    assert arg(model["args"], "--tensor-parallel-size") == "2"
    assert arg(model["args"], "--max-model-len") == "2048"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert any(m["mountPath"] == "/dev/shm" for m in model["volumeMounts"])
    assert {v["name"] for v in predictor["volumes"]} >= {"storage", "shm"}
    # The built-in engine keeps KServe's custom-container predictor.
    (builtin,) = build(ref, MODEL, ServingEngine.BUILTIN)
    assert "model" not in builtin["spec"]["predictor"]
    assert builtin["spec"]["predictor"]["containers"][0]["command"] == ["llmtrain"]
