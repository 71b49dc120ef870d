"""spec.parallelism admission (the pydantic side of each CEL rule) and the DeepSpeed config per mesh.

Each rule: the edge is accepted, one past it is refused with the rule's message. The CEL side of the
same rules is applied to a real apiserver in tests/cluster/test_parallelism_admission.py.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmop import naming
from llmop.builders import JobRef
from llmop.builders.config import build_config_map
from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.deepspeed import gradient_accumulation_steps, render_deepspeed_config
from tests.admission import assert_models_reject

REPO = Path(__file__).resolve().parents[2]
Spec = dict[str, Any]


def spec(**over: Any) -> Spec:
    """A job from scratch on one node of 8 CPU processes under ZeRO-1; ``over`` replaces whole top-level sections."""
    out: Spec = {
        "data": {"sources": [{"uri": "builtin://english"}]},
        "workers": {"numNodes": 1, "procsPerNode": 8, "gpusPerNode": 0},
        # Untied: pipeline stages cannot share the embedding with the head (its own case below).
        "model": {"numLayers": 4, "numHeads": 8, "hiddenSize": 256, "tieEmbeddings": False},
        "training": {"maxSteps": 10, "microBatchSize": 1, "globalBatchSize": 48, "sequenceLength": 256},
        # The default ZeRO-2 is more than DeepSpeed's PipelineEngine takes (its own case below).
        "deepspeed": {"zeroStage": 1},
    }
    for key, value in over.items():
        # A pretrained model takes no from-scratch shape: it replaces the model section whole.
        merge = key in out and not (key == "model" and "pretrained" in value)
        out[key] = {**out[key], **value} if merge else copy.deepcopy(value)
    return out


PRETRAINED = {"pretrained": {"uri": "s3://models/llama"}}

# (case, accepted edge, refused one past it, field path, message fragment)
EDGES: list[tuple[str, Spec, Spec, str, str]] = [
    (
        "world holds whole replicas",
        spec(workers={"numNodes": 3}, parallelism={"sequence": 4}),
        spec(workers={"numNodes": 1, "procsPerNode": 6}, parallelism={"sequence": 4}),
        "spec",
        "must be a multiple of parallelism tensor x pipeline x sequence",
    ),
    (
        "tensor inside a node",
        spec(workers={"numNodes": 2, "procsPerNode": 4}, parallelism={"tensor": 4}),
        spec(workers={"numNodes": 4, "procsPerNode": 2}, parallelism={"tensor": 4}),
        "spec",
        "parallelism.tensor must divide workers.procsPerNode",
    ),
    (
        "tensor splits whole key/value heads",
        spec(model={"numKeyValueHeads": 2}, parallelism={"tensor": 2}),
        spec(model={"numKeyValueHeads": 2}, parallelism={"tensor": 4}),
        "spec",
        "parallelism.tensor must divide model.numHeads and model.numKeyValueHeads",
    ),
    (
        "tensor under ZeRO-2, not ZeRO-3",
        spec(parallelism={"tensor": 2}, deepspeed={"zeroStage": 2}),
        spec(parallelism={"tensor": 2}, deepspeed={"zeroStage": 3}),
        "spec",
        "AutoTP training does not combine with ZeRO-3",
    ),
    (
        "pipeline as deep as the model",
        spec(parallelism={"pipeline": 4}),
        spec(model={"numLayers": 2}, parallelism={"pipeline": 4}),
        "spec",
        "parallelism.pipeline must not exceed model.numLayers",
    ),
    (
        "pipeline under ZeRO-1, not ZeRO-2",
        spec(parallelism={"pipeline": 2}, deepspeed={"zeroStage": 1}),
        spec(parallelism={"pipeline": 2}, deepspeed={"zeroStage": 2}),
        "spec",
        "PipelineEngine supports ZeRO stages 0 and 1 only",
    ),
    (
        "pipeline needs a model from scratch",
        spec(parallelism={"pipeline": 1}, model=PRETRAINED),
        spec(parallelism={"pipeline": 2}, model=PRETRAINED),
        "spec",
        "parallelism.pipeline > 1 needs a model from scratch",
    ),
    (
        "pipeline with LoRA",
        spec(parallelism={"pipeline": 2}, training={"method": "Full"}),
        spec(parallelism={"pipeline": 2}, training={"method": "LoRA"}),
        "spec",
        "parallelism.pipeline > 1 needs training.method Full",
    ),
    (
        "sequence splits whole heads",
        spec(parallelism={"sequence": 8}),
        spec(workers={"numNodes": 2}, parallelism={"sequence": 16}),
        "spec",
        "parallelism.tensor x parallelism.sequence must divide model.numHeads",
    ),
    (
        "sequence splits the sequence evenly",
        spec(parallelism={"sequence": 2}, training={"sequenceLength": 250}),
        spec(parallelism={"sequence": 4}, training={"sequenceLength": 250}),
        "spec",
        "parallelism.sequence must divide training.sequenceLength",
    ),
    (
        "sequence with supervised records",
        spec(parallelism={"sequence": 2}),
        spec(
            parallelism={"sequence": 2},
            data={
                "format": {"type": "PromptCompletion", "promptField": "p", "completionField": "c"},
            },
        ),
        "spec",
        "parallelism.sequence > 1 needs data.format.type Text",
    ),
    (
        "pipeline with untied embeddings only",
        spec(parallelism={"pipeline": 2}),
        spec(parallelism={"pipeline": 2}, model={"tieEmbeddings": True}),
        "spec",
        "parallelism.pipeline > 1 needs model.tieEmbeddings false",
    ),
    (
        "sequence alone, on a model from scratch",
        spec(parallelism={"sequence": 2}),
        spec(parallelism={"tensor": 2, "sequence": 2}),
        "spec",
        "parallelism.sequence > 1 needs a model from scratch and tensor and pipeline 1",
    ),
    (
        "global batch over data-parallel replicas",
        # 8 processes / 4 = 2 replicas: a global batch of 2 divides, 3 does not.
        spec(parallelism={"sequence": 4}, training={"globalBatchSize": 2}),
        spec(parallelism={"sequence": 4}, training={"globalBatchSize": 3}),
        "spec",
        "microBatchSize x the data-parallel size",
    ),
]


@pytest.mark.parametrize(("case", "edge", "past", "where", "fragment"), EDGES, ids=[e[0] for e in EDGES])
def test_each_rule_takes_its_edge_and_refuses_one_past(
    case: str, edge: Spec, past: Spec, where: str, fragment: str
) -> None:
    LLMTrainingJobSpec.model_validate(edge)
    assert_models_reject(LLMTrainingJobSpec, past, case, where, fragment, where)


def test_tensor_x_pipeline_is_accepted() -> None:
    """AutoTP inside the pipeline stages (tests/trainer/test_parallel_tensor_pipeline.py trains it)."""
    job = LLMTrainingJobSpec.model_validate(spec(parallelism={"tensor": 2, "pipeline": 2}))
    assert job.parallelism.data_parallel(8) == 2
    assert render_deepspeed_config(job)["tensor_parallel"]["autotp_size"] == 2


def test_every_mesh_rule_is_in_the_crd_with_the_same_message() -> None:
    """The CRD the apiserver gets carries each mesh rule the models enforce, with the same words."""
    crd = yaml.safe_load((REPO / "crds" / "llmop.io_llmtrainingjobs.yaml").read_text())
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    in_crd = {r["message"]: r["rule"] for r in spec_schema["x-kubernetes-validations"]}
    mesh_rules = [r for r in LLMTrainingJobSpec.rules if "parallelism" in r.cel]
    assert len(mesh_rules) >= 12
    for rule in mesh_rules:
        assert in_crd.get(rule.message) == rule.cel, rule.message


MESHES = {
    "data": {},
    "tensor=2": {"tensor": 2},
    "pipeline=2": {"pipeline": 2},
    "sequence=2": {"sequence": 2},
}


@pytest.mark.parametrize("mesh", MESHES.values(), ids=list(MESHES))
def test_rendered_config_keeps_deepspeeds_batch_identity(mesh: dict[str, int]) -> None:
    """The job's ConfigMap, as the operator renders it, carries a DeepSpeed config that keeps DeepSpeed's
    assertion train_batch_size == micro x accumulation x data-parallel world size for the mesh."""
    job = LLMTrainingJobSpec.model_validate(
        spec(workers={"numNodes": 2}, parallelism=mesh, training={"globalBatchSize": 64, "microBatchSize": 2})
    )
    cm = build_config_map(JobRef("mesh", "team", "uid-1", job))
    parsed = TrainerConfig.model_validate(yaml.safe_load(cm["data"][naming.CONFIG_FILE]))
    assert parsed.spec.parallelism == job.parallelism
    config = parsed.deepspeed_config
    assert config is not None and config == render_deepspeed_config(job)
    replicas = 16 // (mesh.get("tensor", 1) * mesh.get("pipeline", 1) * mesh.get("sequence", 1))
    assert job.parallelism.data_parallel(16) == replicas
    assert config["train_batch_size"] == 64
    assert (
        config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * replicas
        == config["train_batch_size"]
    )
    assert ("tensor_parallel" in config) == (mesh.get("tensor", 1) > 1)
    if mesh.get("tensor", 1) > 1:
        assert config["tensor_parallel"]["autotp_size"] == mesh["tensor"]
    assert config.get("sequence_parallel_size", 1) == mesh.get("sequence", 1)
    assert "pipeline" not in config  # the stage count goes to PipelineModule, not the config


def test_accumulation_at_an_elastic_size_counts_replicas() -> None:
    job = LLMTrainingJobSpec.model_validate(
        spec(
            workers={"numNodes": 2, "minNodes": 1, "maxNodes": 4},
            parallelism={"sequence": 4},
            training={"globalBatchSize": 16},
        )
    )
    # 1 node: 2 replicas -> 8 steps; 4 nodes: 8 replicas -> 2 steps.
    assert gradient_accumulation_steps(job, 8) == 8
    assert gradient_accumulation_steps(job, 32) == 2
    with pytest.raises(ValueError, match="not a multiple of parallelism tensor x pipeline x sequence = 4"):
        gradient_accumulation_steps(job, 6)
