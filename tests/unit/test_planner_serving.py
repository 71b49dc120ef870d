"""Serving hand-off and ONNX export, planned without a cluster."""

from __future__ import annotations

from typing import Any

from llmop.builders import JobRef
from llmop.builders.compress import ONNX, Stage, build_compress_job
from llmop.builders.serving import build
from llmop.conditions import get, is_true
from llmop.observe import ServingView
from tests.unit.test_planner_stages import COMPRESSION, job, result_pod, spec, step, trained_pods

SERVING = {"enabled": True, "replicas": 2, "port": 8000, "resources": {"limits": {"cpu": "2"}}}


def serving_spec(**serving: Any) -> Any:
    s = spec(None)
    raw = s.to_wire()
    raw["serving"] = {**SERVING, **serving}
    return type(s).model_validate(raw)


def succeeded(s: Any) -> dict[str, Any]:
    return dict(step(s, {"attempt": 1}, pods=trained_pods()).status)


def compressed(s: Any) -> Any:
    """Trained, then all three stages of COMPRESSION done; quantize-1 is the smallest within budget."""
    done = dict(active=0, succeeded=True)
    return step(
        s,
        succeeded(s),
        compress_jobs=[job("quantize-0", **done), job("quantize-1", **done), job("prune-0", **done)],
        compress_pods=[
            result_pod("quantize-0", 300, 0.5),
            result_pod("quantize-1", 200, 1.0),
            result_pod("prune-0", 250, 2.0),
        ],
    )


def test_succeeded_job_serves_the_trained_model_and_reports_readiness() -> None:
    s = serving_spec()
    status = succeeded(s)
    assert status["state"] == "Succeeded"
    p = step(s, status)
    assert p.serve_model == "/m/model"
    assert p.status["serving"]["url"] == "http://j-serve.ns.svc:8000/v1"
    assert p.status["serving"]["ready"] is False and p.status["state"] == "Succeeded"
    ready = step(s, p.status, serving=ServingView("Deployment", 2, 2, True))
    assert ready.status["state"] == "Serving" and is_true(ready.status["conditions"], "Serving")
    assert ready.status["serving"]["readyReplicas"] == 2
    assert is_true(ready.status["conditions"], "Succeeded"), (
        "kubectl wait --for=condition=Succeeded still works"
    )


def test_turning_serving_off_removes_it() -> None:
    s = serving_spec()
    served = step(s, succeeded(s), serving=ServingView("Deployment", 2, 2, True)).status
    off = serving_spec(enabled=False)
    p = step(off, served, serving=ServingView("Deployment", 2, 2, True))
    assert p.remove_serving and p.serve_model is None and "serving" not in p.status
    assert p.status["state"] == "Succeeded"
    condition = get(p.status["conditions"], "Serving")
    assert condition is not None and condition["reason"] == "ServingDisabled"


def test_missing_kserve_is_reported_not_retried_blindly() -> None:
    s = serving_spec(kserve=True)
    p = step(
        s, succeeded(s), serving_unavailable="serving.kserve is true but the KServe CRDs are not installed"
    )
    assert p.serve_model is None
    condition = get(p.status["conditions"], "Serving")
    assert condition is not None and condition["reason"] == "ServingUnavailable"


def test_onnx_export_of_the_selected_model_runs_before_success() -> None:
    raw = spec().to_wire()
    raw["serving"] = {"enabled": True, "onnxExport": True, "source": "Selected"}
    s = type(spec()).model_validate(raw)
    p = compressed(s)
    assert [st.name for st in p.create_compress] == [ONNX]
    assert p.create_compress[0].model_dir == "/m/compressed/quantize-1"  # the selected, smallest one
    assert p.status["state"] == "Compressing" and not is_true(p.status["conditions"], "Succeeded")
    onnx_pod = result_pod(ONNX, 100, 0.0)
    p2 = step(
        s,
        p.status,
        compress_jobs=[job(ONNX, active=0, succeeded=True)],
        compress_pods=[onnx_pod],
    )
    assert is_true(p2.status["conditions"], "Succeeded")
    p3 = step(s, p2.status)
    assert p3.serve_model == "/m/compressed/quantize-1"
    assert p3.status["serving"]["onnxPath"] == "/m/compressed/onnx"


def test_source_trained_serves_the_trained_model_despite_a_selection() -> None:
    raw = spec().to_wire()
    raw["serving"] = {"enabled": True, "source": "Trained"}
    s = type(spec()).model_validate(raw)
    finished = compressed(s).status
    assert finished["outputModelPath"] == "/m/compressed/quantize-1"
    assert step(s, finished).serve_model == "/m/model"


def test_serving_manifests() -> None:
    s = serving_spec()
    deployment, service = build(JobRef("j", "ns", "uid", s), "/var/lib/llmop/output/model")
    assert deployment["kind"] == "Deployment" and deployment["spec"]["replicas"] == 2
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == "uid"
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][:3] == ["serve", "--model-dir", "/var/lib/llmop/output/model"]
    assert container["args"][container["args"].index("--host") + 1] == "$(POD_IP)"
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in container["env"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"] == {"limits": {"cpu": "2"}}
    assert pod["serviceAccountName"] == "j-trainer" and pod["automountServiceAccountToken"] is False
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 8000
    (isvc,) = build(JobRef("j", "ns", "uid", serving_spec(kserve=True)), "/m")
    assert isvc["kind"] == "InferenceService" and isvc["spec"]["predictor"]["minReplicas"] == 2
    onnx = build_compress_job(JobRef("j", "ns", "uid", spec(COMPRESSION)), Stage(ONNX, "ONNX", "/m/x"))
    args = onnx["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["export-onnx", "--model-dir", "/m/x", "--out", "/var/lib/llmop/output/onnx"]
