"""The whole lifecycle on the development runtime: train, compress, select, export, serve, unserve.

Real operator, real `llmtrain` processes for every stage: two training pods, an int8 quantisation and
a magnitude-pruning Job in parallel, the ONNX export of the selected model, and a serving Deployment
whose pod answers completions on its loopback pod IP.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from llmop import naming
from tests.cluster.conftest import Jobs, OperatorProcess
from tests.e2e.conftest import claim_dir, tiny_job
from tests.e2e.test_local_runtime import apply, wait_state
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        return resp.status, json.loads(resp.read())


def test_trained_model_is_compressed_selected_exported_and_served(
    cluster: Cluster, namespace: str, jobs: Jobs, local_operator: OperatorProcess
) -> None:
    manifest = tiny_job("life", max_steps=100, after_training=True)
    manifest["spec"]["compression"]["pruning"][0]["recoverySteps"] = 10
    manifest["spec"]["serving"]["onnxExport"] = True
    apply(cluster, namespace, manifest)
    status = wait_state(jobs, "life", ("Serving",), timeout=900)

    stages = {s["name"]: s for s in status["stages"]}
    assert list(stages) == ["prepare", "train", "quantize-0", "prune-0", "onnx"]
    assert all(s["state"] == "Succeeded" for s in stages.values()), stages
    quantized, pruned = stages["quantize-0"]["results"], stages["prune-0"]["results"]
    print(f"quantize-0: {stages['quantize-0']['message']}; prune-0: {stages['prune-0']['message']}")
    # The figures in status are the files on the job's volume: int8 weights are about a quarter of fp32.
    storage = claim_dir(cluster, namespace, "life-storage")
    on_volume = storage / Path(stages["quantize-0"]["outputPath"]).relative_to(naming.STORAGE_MOUNT)
    int8_bytes = (on_volume / "model.safetensors").stat().st_size
    fp32_bytes = (storage / "output" / "model" / "model.safetensors").stat().st_size
    assert quantized["sizeBytes"] == int8_bytes and quantized["baselineSizeBytes"] == fp32_bytes
    assert quantized["sizeRatio"] == pytest.approx(int8_bytes / fp32_bytes, abs=1e-6)
    assert quantized["sizeRatio"] <= 0.30, quantized
    assert quantized["perplexity"] > 1
    assert abs(pruned["sparsity"] - 0.5) < 0.02
    assert stages["onnx"]["results"]["maxAbsDiff"] <= stages["onnx"]["results"]["tolerance"]

    # The selection rule picked one of the compressed models, and serving uses it.
    assert status["selectedStage"] in ("quantize-0", "prune-0")
    assert status["outputModelPath"] == stages[status["selectedStage"]]["outputPath"]
    serving = status["serving"]
    assert serving["url"] == f"http://life-serve.{namespace}.svc:8000/v1"
    assert serving["ready"] is True and serving["modelPath"] == status["outputModelPath"]
    assert serving["onnxPath"] == stages["onnx"]["outputPath"]
    assert (storage / "output" / "model" / "model.safetensors").exists(), "the trained model is kept"
    assert (storage / "output" / "onnx" / "model.onnx").exists()

    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "llmop.io/role=serve")["items"]
    (pod,) = [p for p in pods if p["status"].get("phase") == "Running"]
    ip = pod["status"]["podIP"]
    assert ip.startswith("127.2.")
    code, answer = post(
        f"http://{ip}:8000/v1/completions",
        {"model": "life", "prompt": "The software is provided", "max_tokens": 12, "temperature": 0},
    )
    assert code == 200 and answer["choices"][0]["text"].strip(), answer
    print(f"completion from {ip}: {answer['choices'][0]['text']!r}")

    # Serving off: the server goes, the job and its results stay.
    jobs.patch_spec("life", {"serving": {"enabled": False}})
    wait_for(
        lambda: (
            not cluster.kubectl_json("get", "deployments", "-n", namespace, "-l", "llmop.io/role=serve")[
                "items"
            ]
        ),
        timeout=60,
        what="serving Deployment removed",
    )
    after = wait_state(jobs, "life", ("Succeeded",), timeout=60)
    assert "serving" not in after and after["selectedStage"] == status["selectedStage"]
