"""A mesh DeepSpeed cannot run is refused by the real apiserver (the CRD's CEL rules), with the message
that names the numbers' constraint, and nothing is created; a mesh it can run is accepted.

tests/unit/test_parallelism_api.py checks the same rules on the pydantic side, edge by edge.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.kube import Cluster

Manifest = dict[str, Any]


def job(parallelism: dict[str, int], **spec: Any) -> Manifest:
    """One node of 4 CPU processes, a model from scratch (untied), ZeRO-1; ``spec`` replaces whole sections."""
    body: Manifest = {
        "data": {"sources": [{"uri": "builtin://english"}]},
        "workers": {"procsPerNode": 4, "gpusPerNode": 0},
        "model": {"tieEmbeddings": False},  # pipeline stages cannot share the embedding with the head
        "training": {"maxSteps": 10, "microBatchSize": 1, "globalBatchSize": 8},
        "deepspeed": {"zeroStage": 1},
        "parallelism": parallelism,
    }
    body.update(spec)
    return {
        "apiVersion": "llmop.io/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": "mesh"},
        "spec": body,
    }


# (case, manifest, what the refusal must say)
REFUSED: list[tuple[str, Manifest, str]] = [
    (
        "world of 4 holds no whole replica of 3",
        job({"tensor": 1, "pipeline": 3}),
        "workers.numNodes x workers.procsPerNode must be a multiple of parallelism tensor x pipeline x sequence",
    ),
    (
        "tensor across nodes",
        job({"tensor": 8}, workers={"numNodes": 2, "procsPerNode": 4, "gpusPerNode": 0}),
        "parallelism.tensor must divide workers.procsPerNode",
    ),
    (
        "tensor under ZeRO-3",
        job({"tensor": 2}, deepspeed={"zeroStage": 3}),
        "AutoTP training does not combine with ZeRO-3",
    ),
    (
        "pipeline under ZeRO-2",
        job({"pipeline": 2}, deepspeed={"zeroStage": 2}),
        "PipelineEngine supports ZeRO stages 0 and 1 only",
    ),
    (
        "pipeline deeper than the model",
        job({"pipeline": 4}, model={"numLayers": 2}),
        "parallelism.pipeline must not exceed model.numLayers",
    ),
    (
        "pipeline with tied embeddings",
        job({"pipeline": 2}, model={"tieEmbeddings": True}),
        "parallelism.pipeline > 1 needs model.tieEmbeddings false",
    ),
    (
        "tensor x sequence",
        job({"tensor": 2, "sequence": 2}),
        "parallelism.sequence > 1 needs a model from scratch and tensor and pipeline 1",
    ),
    (
        "pipeline of a pretrained model",
        job({"pipeline": 2}, model={"pretrained": {"uri": "s3://models/llama"}}),
        "parallelism.pipeline > 1 needs a model from scratch",
    ),
    (
        "sequence splitting a head",
        job({"sequence": 4}, model={"numHeads": 2, "hiddenSize": 128}),
        "parallelism.tensor x parallelism.sequence must divide model.numHeads",
    ),
    (
        "sequence not dividing the sequence length",
        job(
            {"sequence": 4},
            training={"maxSteps": 10, "microBatchSize": 1, "globalBatchSize": 8, "sequenceLength": 250},
        ),
        "parallelism.sequence must divide training.sequenceLength",
    ),
    (
        "sequence with prompt/completion records",
        job(
            {"sequence": 2},
            data={
                "sources": [{"uri": "builtin://english"}],
                "format": {"type": "PromptCompletion", "promptField": "p", "completionField": "c"},
            },
            model={"pretrained": {"uri": "s3://models/llama"}},
        ),
        "parallelism.sequence > 1 needs data.format.type Text",
    ),
    (
        "global batch over 2 replicas",
        job({"tensor": 2}, training={"maxSteps": 10, "microBatchSize": 1, "globalBatchSize": 3}),
        "training.globalBatchSize must be a multiple of training.microBatchSize x the data-parallel size",
    ),
]


def _create(cluster: Cluster, namespace: str, manifest: Manifest) -> tuple[int, str]:
    proc = cluster.kubectl(
        "create", "--validate=strict", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False
    )
    return proc.returncode, " ".join(proc.stderr.split())


@pytest.mark.cluster
@pytest.mark.parametrize(("case", "manifest", "says"), REFUSED, ids=[c[0] for c in REFUSED])
def test_a_mesh_deepspeed_cannot_run_is_refused(
    cluster: Cluster, namespace: str, case: str, manifest: Manifest, says: str
) -> None:
    code, message = _create(cluster, namespace, manifest)
    print(f"\n[{case}] {message}")
    assert code != 0, f"{case}: the apiserver accepted it"
    assert says in message, f"{case}: {message}"
    assert "mesh" not in cluster.kubectl("get", "llmtrainingjobs", "-n", namespace, "-o", "name").stdout


@pytest.mark.cluster
@pytest.mark.parametrize(
    "mesh",
    [{"tensor": 2}, {"pipeline": 2}, {"tensor": 2, "pipeline": 2}, {"sequence": 2}, {"sequence": 4}],
    ids=["tensor=2", "pipeline=2", "tensor=2 x pipeline=2", "sequence=2", "sequence=4"],
)
def test_a_mesh_deepspeed_runs_is_accepted(cluster: Cluster, namespace: str, mesh: dict[str, int]) -> None:
    code, message = _create(cluster, namespace, job(mesh))
    assert code == 0, message
