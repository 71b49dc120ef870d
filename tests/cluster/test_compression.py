"""Compression stages on the real cluster: created after training only, reported, retried, isolated."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmop.conditions import parse_time
from tests.cluster.conftest import Jobs, OperatorProcess
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster

# The kwok stand-in for `llmtrain`: every pod of the job (workers and compression pods) ends after
# a while with this termination message, which carries both the training and the compression figures.
MESSAGE = {
    "step": 100,
    "totalSteps": 100,
    "validationLoss": 3.5,
    "modelPath": "/var/lib/llmop/output/model",
    "results": {"sizeBytes": 1000.0, "sizeRatio": 0.27, "perplexityIncreasePercent": 1.2, "speedup": 1.6},
}
COMPRESSION: dict[str, Any] = {
    "quantization": [{"method": "Int8WeightOnly"}, {"method": "Int4WeightOnly", "groupSize": 64}],
    "pruning": [{"method": "Structured", "sparsity": 0.25, "recoverySteps": 10}],
    "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}},
    "backoffLimit": 1,
}


def compress_jobs(cluster: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl_json(
        "get", "jobs", "-n", ns, "-l", f"llmop.io/job-name={name},llmop.io/role=compress"
    )
    return list(out["items"])


def test_compression_runs_after_training_and_a_failing_method_is_retried_alone(
    jobs: Jobs, operator: OperatorProcess, cluster: Cluster
) -> None:
    # The workers train until told to stop below; compression pods (batch Job pods) end after 1s.
    annotations = {
        "llmop.io/kwok-termination-message": json.dumps(MESSAGE),
        "llmop.io/kwok-fail-stage": "quantize-1",
    }
    jobs.create("cmp", workers={"podAnnotations": annotations}, compression=COMPRESSION)

    # While the gang trains there is no compression Job.
    jobs.wait_condition("cmp", "Running")
    assert compress_jobs(cluster, jobs.ns, "cmp") == []
    jobs.annotate_pods("cmp", {"llmop.io/kwok-exit-after": "1s"})
    created = wait_for(
        lambda: (js := compress_jobs(cluster, jobs.ns, "cmp")) and len(js) == 3 and js,
        timeout=30,
        what="three compression Jobs",
    )
    # ... and each was created after every worker had exited 0.
    finished = [
        p["status"]["containerStatuses"][0]["state"]["terminated"]
        for p in jobs.pods("cmp")
        if p["status"].get("phase") == "Succeeded"
    ]
    assert len(finished) == 4 and all(t["exitCode"] == 0 for t in finished)
    last_exit = max(parse_time(t["finishedAt"]) for t in finished)
    assert all(parse_time(j["metadata"]["creationTimestamp"]) >= last_exit for j in created)
    trained = jobs.condition("cmp", "Trained")
    assert trained and trained["status"] == "True"
    by_stage = {j["metadata"]["labels"]["llmop.io/stage"]: j for j in created}
    assert sorted(by_stage) == ["prune-0", "quantize-0", "quantize-1"]
    for stage, job in by_stage.items():
        owner = job["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "LLMTrainingJob" and owner["name"] == "cmp" and owner["controller"] is True
        assert job["spec"]["backoffLimit"] == 1
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["llmtrain"]
        assert container["args"] == ["compress", "/etc/llmop/config.yaml", "--stage", stage]
        assert container["resources"] == {
            "requests": {"cpu": "1", "memory": "2Gi"},
            "limits": {"memory": "2Gi"},
        }
        assert job["spec"]["template"]["spec"]["serviceAccountName"] == "cmp-trainer"

    failed = jobs.wait_condition("cmp", "Failed", timeout=90)
    assert failed["reason"] == "CompressionFailed" and "quantize-1" in failed["message"]
    status = jobs.status("cmp")
    stages = {s["name"]: s for s in status["stages"]}
    assert stages["train"]["state"] == "Succeeded"
    assert stages["quantize-1"]["state"] == "Failed"
    # Retried per backoffLimit 1: two failed pods before the Job gave up.
    pods = cluster.kubectl_json("get", "pods", "-n", jobs.ns, "-l", "llmop.io/stage=quantize-1")["items"]
    assert len([p for p in pods if p["status"].get("phase") == "Failed"]) == 2
    for name in ("quantize-0", "prune-0"):
        assert stages[name]["state"] == "Succeeded", stages[name]
        assert stages[name]["results"]["sizeRatio"] == 0.27
        assert stages[name]["outputPath"] == "/var/lib/llmop/output/model"
        condition = jobs.condition("cmp", f"stage.llmop.io/{name}")
        assert condition and condition["status"] == "True"
    assert stages["prune-0"]["method"] == "Structured"
    # Training's own figures arrived too, and the trained model stays the output.
    assert status["progress"]["validationLoss"] == 3.5 and status["progress"]["percent"] == 100
    assert status["outputModelPath"] == "/var/lib/llmop/output/model"

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(operator.metrics())
        for s in family.samples
    }
    ns = jobs.ns
    ratio = ("figure", "sizeRatio"), ("job", "cmp"), ("method", "Int8WeightOnly"), ("namespace", ns)
    assert samples[("llmop_compression_result", (*ratio, ("stage", "quantize-0")))] == 0.27
    failed_stage = (
        ("method", "Int4WeightOnly"),
        ("namespace", ns),
        ("result", "Failed"),
        ("stage", "quantize"),
    )
    assert samples[("llmop_stage_duration_seconds_count", failed_stage)] == 1
