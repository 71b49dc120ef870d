"""Compression after training, planned without a cluster: stages, retries, results and selection."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from typing import Any

from llmop.builders import JobRef
from llmop.builders.compress import build_compress_job, stages
from llmop.conditions import get, is_true
from llmop.observe import BatchJobView, PodView
from llmop.planner import Observed
from llmop.termination import final_figures
from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec
from tests.unit.test_planner import NOW, plan, pod, snapshot

COMPRESSION: dict[str, Any] = {
    "quantization": [{"method": "Int8WeightOnly"}, {"method": "Int4WeightOnly", "groupSize": 32}],
    "pruning": [{"method": "Magnitude", "sparsity": 0.5}],
    "selection": {"objective": "Smallest", "maxPerplexityIncreasePercent": 3},
    "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
    "backoffLimit": 3,
}
TRAIN_MESSAGE = json.dumps(
    {
        "stage": "train",
        "step": 40,
        "totalSteps": 40,
        "loss": 4.1,
        "validationLoss": 4.25,
        "validationStep": 40,
        "modelPath": "/m/model",
    }
)


def spec(compression: dict[str, Any] | None = COMPRESSION) -> LLMTrainingJobSpec:
    raw: dict[str, Any] = {
        "data": {"prepare": False},
        "training": {"maxSteps": 40, "globalBatchSize": 2, "microBatchSize": 1},
        "workers": {"numNodes": 2, "procsPerNode": 1, "gpusPerNode": 1, "podAnnotations": {"a": "b"}},
    }
    if compression is not None:
        raw["compression"] = compression
    return LLMTrainingJobSpec.model_validate(raw)


def trained_pods() -> list[PodView]:
    return [
        pod(0, phase="Succeeded", exit_code=0, termination_message=TRAIN_MESSAGE),
        pod(1, phase="Succeeded", exit_code=0),
    ]


def job(stage: str, **kw: Any) -> BatchJobView:
    base = BatchJobView(f"j-{stage}", succeeded=False, failed=False, message="", active=1, stage=stage)
    return replace(base, **kw)


def result_pod(stage: str, size: float, ppl_increase: float) -> PodView:
    message = {
        "stage": stage,
        "modelPath": f"/m/compressed/{stage}",
        "results": {"sizeBytes": size, "perplexityIncreasePercent": ppl_increase, "sizeRatio": size / 1000},
    }
    return pod(0, phase="Succeeded", exit_code=0, stage=stage, termination_message=json.dumps(message))


def step(s: LLMTrainingJobSpec, status: dict[str, Any], **seen: Any) -> Any:
    return plan(snapshot(s, status), Observed(seen.pop("pods", []), None, NOW, **seen))


def test_training_success_starts_every_stage_and_records_final_figures() -> None:
    p = step(spec(), {"attempt": 1}, pods=trained_pods())
    assert [st.name for st in p.create_compress] == ["quantize-0", "quantize-1", "prune-0"]
    assert p.status["state"] == "Compressing" and not is_true(p.status["conditions"], "Succeeded")
    assert is_true(p.status["conditions"], "Trained")
    progress = p.status["progress"]
    assert progress["validationLoss"] == 4.25 and progress["validationStep"] == 40 and progress["loss"] == 4.1
    assert progress["percent"] == 100
    assert p.status["outputModelPath"] == "/m/model"
    condition = get(p.status["conditions"], "stage.llmop.io/quantize-1")
    assert condition is not None and condition["status"] == "False" and condition["reason"] == "Running"


def test_no_compression_means_success_right_after_training() -> None:
    p = step(spec(None), {"attempt": 1}, pods=trained_pods())
    assert p.status["state"] == "Succeeded" and not p.create_compress


def test_trained_job_never_trains_again_even_without_worker_pods() -> None:
    first = step(spec(), {"attempt": 1}, pods=trained_pods())
    again = step(spec(), first.status, pods=[])
    assert not again.create_workers and again.status["state"] == "Compressing"


def test_results_land_in_status_and_the_smallest_within_budget_is_selected() -> None:
    status = step(spec(), {"attempt": 1}, pods=trained_pods()).status
    done = dict(active=0, succeeded=True)
    p = step(
        spec(),
        status,
        compress_jobs=[job("quantize-0", **done), job("quantize-1", **done), job("prune-0", **done)],
        compress_pods=[
            result_pod("quantize-0", 300, 0.5),
            result_pod("quantize-1", 200, 9.0),  # smallest, but over the 3% budget
            result_pod("prune-0", 250, 2.0),
        ],
    )
    assert p.status["state"] == "Succeeded" and is_true(p.status["conditions"], "Compressed")
    stage = next(s for s in p.status["stages"] if s["name"] == "quantize-0")
    assert stage["results"]["sizeRatio"] == 0.3 and stage["method"] == "Int8WeightOnly"
    assert stage["outputPath"] == "/m/compressed/quantize-0" and "size x0.300" in stage["message"]
    assert p.status["selectedStage"] == "prune-0"
    assert p.status["outputModelPath"] == "/m/compressed/prune-0"
    assert sorted(s["name"] for s in p.finished_stages) == ["prune-0", "quantize-0", "quantize-1"]


def test_a_failed_stage_fails_the_job_only_after_the_others_finish() -> None:
    status = step(spec(), {"attempt": 1}, pods=trained_pods()).status
    failed = job("quantize-1", active=0, failed=True, failures=4, message="BackoffLimitExceeded")
    p = step(spec(), status, compress_jobs=[job("quantize-0"), failed, job("prune-0")])
    assert p.status["state"] == "Compressing"
    q1 = next(s for s in p.status["stages"] if s["name"] == "quantize-1")
    assert q1["state"] == "Failed" and q1["retries"] == 4
    done = dict(active=0, succeeded=True)
    p2 = step(
        spec(),
        p.status,
        compress_jobs=[job("quantize-0", **done), job("prune-0", **done)],
        compress_pods=[result_pod("quantize-0", 300, 0.5), result_pod("prune-0", 250, 1.0)],
    )
    assert p2.status["state"] == "Failed"
    failed_condition = get(p2.status["conditions"], "Failed")
    assert failed_condition is not None and failed_condition["reason"] == "CompressionFailed"
    assert "quantize-1" in failed_condition["message"]
    # The others' results are kept, and the trained model stays the output.
    assert next(s for s in p2.status["stages"] if s["name"] == "prune-0")["results"]["sizeBytes"] == 250
    assert p2.status["outputModelPath"] == "/m/model"


def test_retries_are_visible_while_a_stage_runs() -> None:
    status = step(spec(), {"attempt": 1}, pods=trained_pods()).status
    p = step(spec(), status, compress_jobs=[job("quantize-0", failures=1), job("quantize-1"), job("prune-0")])
    condition = get(p.status["conditions"], "stage.llmop.io/quantize-0")
    assert condition is not None and "retry 1" in condition["message"]


def test_compress_job_manifest() -> None:
    s = spec()
    ref = JobRef("j", "ns", "uid", s)
    names = [st.name for st in stages(s)]
    manifest = build_compress_job(ref, stages(s)[1])
    assert names == ["quantize-0", "quantize-1", "prune-0"]
    assert manifest["metadata"]["name"] == "j-quantize-1"
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "uid"
    assert manifest["spec"]["backoffLimit"] == 3
    template = manifest["spec"]["template"]
    assert template["metadata"]["labels"]["llmop.io/stage"] == "quantize-1"
    assert template["metadata"]["annotations"] == {"a": "b"}
    container = template["spec"]["containers"][0]
    assert container["args"] == ["compress", "/etc/llmop/config.yaml", "--stage", "quantize-1"]
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    assert not any(e["name"].startswith("MASTER_") for e in container["env"])
    assert "schedulingGates" not in template["spec"] and template["spec"]["restartPolicy"] == "Never"


def test_termination_messages_are_untrusted() -> None:
    assert final_figures("Traceback (most recent call last): ...").results == {}
    odd = final_figures(json.dumps({"results": {"a": "x", "b": True, "c": float("inf"), "d": 2}}))
    assert odd.results == {"d": 2.0}
    assert final_figures(json.dumps([1, 2])).model_path is None


def test_final_goodput_and_energy_come_from_the_trainers_last_words() -> None:
    message = {**json.loads(TRAIN_MESSAGE), "results": {"productiveSeconds": 1500.0, "energyJoules": 3.6e6}}
    message["results"]["joulesPerToken"] = 0.5
    pods = [pod(0, phase="Succeeded", exit_code=0, termination_message=json.dumps(message))]
    pods.append(pod(1, phase="Succeeded", exit_code=0))
    started = (NOW - timedelta(seconds=2000)).strftime("%Y-%m-%dT%H:%M:%SZ")
    before = {"step": 39, "energyMeasured": True, "energyJoules": 1.0, "productiveSeconds": 10.0}
    p = step(spec(None), {"attempt": 1, "startTime": started, "progress": before}, pods=pods)
    progress = p.status["progress"]
    assert progress["productiveSeconds"] == 1500.0 and progress["goodput"] == 0.75
    assert (progress["energyJoules"], progress["energyKwh"], progress["joulesPerToken"]) == (3.6e6, 1.0, 0.5)
    assert progress["step"] == 40
