"""Bad manifests are rejected at admission by the real apiserver, with a message naming the field.

Every case is also fed to the pydantic models the trainer validates its configuration with, so the
CRD schema and the models cannot drift apart on what they accept.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.job import IMMUTABLE_SECTIONS, MAX_NAME_LENGTH, NAME_RULE, name_problem
from tests.admission import assert_models_reject
from tests.kube import Cluster

REPO = Path(__file__).resolve().parents[2]
Manifest = dict[str, Any]


def base() -> Manifest:
    return {
        "apiVersion": "llmop.io/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": "bad"},
        "spec": {"data": {"sources": [{"uri": "builtin://english"}]}, "training": {"maxSteps": 100}},
    }


def put(path: str, value: Any) -> Callable[[Manifest], None]:
    def apply(m: Manifest) -> None:
        *parents, leaf = path.split(".")
        node = m
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return apply


def drop(path: str) -> Callable[[Manifest], None]:
    def apply(m: Manifest) -> None:
        *parents, leaf = path.split(".")
        node = m
        for key in parents:
            node = node[key]
        del node[leaf]

    return apply


def both(*changes: Callable[[Manifest], None]) -> Callable[[Manifest], None]:
    def apply(m: Manifest) -> None:
        for change in changes:
            change(m)

    return apply


SECRET_KEY = {"name": "creds", "key": "token"}
VOLUME = {"name": "data", "mountPath": "/mnt/data", "persistentVolumeClaim": {"claimName": "corpus"}}

# (case id, change to a valid manifest, text the rejection must contain)
CASES: list[tuple[str, Callable[[Manifest], None], str]] = [
    ("wrong type: string for integer", put("spec.training.maxSteps", "many"), "spec.training.maxSteps"),
    ("wrong type: list for map", put("spec.workers.nodeSelector", ["gpu"]), "spec.workers.nodeSelector"),
    (
        "wrong type: number for boolean",
        put("spec.data.cleaning.redactPii", 1),
        "spec.data.cleaning.redactPii",
    ),
    ("below minimum", put("spec.workers.numNodes", 0), "spec.workers.numNodes"),
    ("above maximum", put("spec.deepspeed.zeroStage", 4), "spec.deepspeed.zeroStage"),
    (
        "exclusive minimum",
        put("spec.training.optimizer.learningRate", 0),
        "spec.training.optimizer.learningRate",
    ),
    (
        "fraction out of range",
        put("spec.data.sharding.validationFraction", 0.6),
        "spec.data.sharding.validationFraction",
    ),
    ("unknown enum: precision", put("spec.training.precision", "INT3"), "spec.training.precision"),
    ("unknown enum: optimizer", put("spec.training.optimizer.type", "Lion"), "spec.training.optimizer.type"),
    (
        "unknown enum: restart policy",
        put("spec.runPolicy.restartPolicy", "Sometimes"),
        "spec.runPolicy.restartPolicy",
    ),
    (
        "unknown enum: quantisation",
        put("spec.compression", {"quantization": [{"method": "Int2"}]}),
        "spec.compression.quantization[0].method",
    ),
    ("pattern: access mode", put("spec.storage.accessMode", "ReadOnlyMany"), "spec.storage.accessMode"),
    ("missing required: training", drop("spec.training"), "spec.training"),
    ("missing required: data", drop("spec.data"), "spec.data"),
    (
        "missing required: source uri",
        put("spec.data.sources", [{"format": "JSONL"}]),
        "spec.data.sources[0].uri",
    ),
    (
        "contradiction: batch sizes do not divide",
        both(put("spec.workers.numNodes", 3), put("spec.training.globalBatchSize", 16)),
        "spec.training.globalBatchSize",
    ),
    (
        "mesh: world not a multiple of the model-parallel size",
        both(put("spec.workers", {"numNodes": 3, "gpusPerNode": 0}), put("spec.parallelism", {"tensor": 2})),
        "spec.parallelism",
    ),
    (
        "mesh: batch does not divide over the data-parallel replicas",
        both(
            put("spec.workers", {"numNodes": 3, "procsPerNode": 2, "gpusPerNode": 0}),
            put("spec.parallelism", {"tensor": 2}),
            put("spec.training.microBatchSize", 4),
            put("spec.training.globalBatchSize", 16),
            put("spec.deepspeed", {"zeroStage": 1}),
        ),
        "spec.training.globalBatchSize",
    ),
    (
        "mesh: tensor parallel across nodes",
        both(
            put("spec.workers", {"numNodes": 2, "procsPerNode": 1, "gpusPerNode": 0}),
            put("spec.parallelism", {"tensor": 2}),
            put("spec.deepspeed", {"zeroStage": 1}),
        ),
        "spec.parallelism.tensor",
    ),
    (
        "mesh: tensor parallel splitting a key/value head",
        both(
            put("spec.workers", {"procsPerNode": 4, "gpusPerNode": 0}),
            put("spec.parallelism", {"tensor": 4}),
            put("spec.model", {"numHeads": 4, "numKeyValueHeads": 2}),
            put("spec.deepspeed", {"zeroStage": 1}),
            put("spec.training.globalBatchSize", 16),
        ),
        "spec.parallelism.tensor",
    ),
    (
        "mesh: tensor parallel with ZeRO-3",
        both(
            put("spec.workers", {"procsPerNode": 2, "gpusPerNode": 0}),
            put("spec.parallelism", {"tensor": 2}),
            put("spec.deepspeed", {"zeroStage": 3}),
        ),
        "spec.deepspeed.zeroStage",
    ),
    (
        "mesh: tensor parallel with an L1 penalty",
        both(
            put("spec.workers", {"procsPerNode": 2, "gpusPerNode": 0}),
            put("spec.parallelism", {"tensor": 2}),
            put("spec.deepspeed", {"zeroStage": 1}),
            put("spec.training.regularization", {"l1": 0.001}),
        ),
        "spec.parallelism",
    ),
    (
        "mesh: pipeline parallel with tied embeddings",
        both(
            put("spec.workers", {"procsPerNode": 2, "gpusPerNode": 0}),
            put("spec.parallelism", {"pipeline": 2}),
            put("spec.deepspeed", {"zeroStage": 1}),
        ),
        "spec.parallelism.pipeline",
    ),
    (
        "contradiction: optimizer offload without ZeRO",
        both(put("spec.deepspeed.zeroStage", 0), put("spec.deepspeed.offloadOptimizer", "CPU")),
        "spec.deepspeed.offloadOptimizer",
    ),
    (
        "contradiction: parameter offload below ZeRO 3",
        put("spec.deepspeed.offloadParameters", "CPU"),
        "spec.deepspeed.offloadParameters",
    ),
    (
        "contradiction: both maxSteps and maxTokens",
        put("spec.training.maxTokens", 1000000),
        "spec.training.maxSteps",
    ),
    (
        "contradiction: neither maxSteps nor maxTokens",
        drop("spec.training.maxSteps"),
        "spec.training.maxSteps",
    ),
    (
        "contradiction: sequence longer than context",
        put("spec.training.sequenceLength", 512),
        "spec.training.sequenceLength",
    ),
    (
        "contradiction: heads do not divide width",
        put("spec.model", {"hiddenSize": 100, "numHeads": 3}),
        "spec.model.hiddenSize",
    ),
    (
        "contradiction: processes vs GPUs",
        both(put("spec.workers.procsPerNode", 4), put("spec.workers.gpusPerNode", 8)),
        "spec.workers.procsPerNode",
    ),
    (
        "contradiction: sparsity ends before it starts",
        put("spec.training.sparsity", {"startStep": 500, "endStep": 100}),
        "spec.training.sparsity.endStep",
    ),
    ("contradiction: prepare without sources", put("spec.data.sources", []), "spec.data.sources"),
    (
        "contradiction: group size on int8",
        put("spec.compression", {"quantization": [{"method": "Int8WeightOnly", "groupSize": 64}]}),
        "spec.compression.quantization[0].groupSize",
    ),
    (
        "contradiction: synonyms without thesaurus",
        put("spec.data.augmentation", {"synonymReplacement": 0.1}),
        "spec.data.augmentation.thesaurusPath",
    ),
    (
        "contradiction: warmup longer than the run",
        put("spec.training.lrSchedule", {"warmupSteps": 101}),
        "spec.training.lrSchedule.warmupSteps",
    ),
    (
        "contradiction: warmup longer than the steps maxTokens gives",
        # 8 x 256 tokens a step: 204800 tokens are exactly 100 steps.
        both(
            drop("spec.training.maxSteps"),
            put("spec.training.maxTokens", 204800),
            put("spec.training.lrSchedule", {"warmupSteps": 101}),
        ),
        "spec.training.lrSchedule.warmupSteps",
    ),
    (
        "contradiction: sparsity target reached after the last step",
        put("spec.training.sparsity", {"enabled": True, "endStep": 101}),
        "spec.training.sparsity.endStep",
    ),
    (
        "contradiction: odd head dimension",
        put("spec.model", {"hiddenSize": 36, "numHeads": 4}),
        "spec.model.hiddenSize",
    ),
    (
        "contradiction: mean word length bounds cross",
        put("spec.data.cleaning", {"minMeanWordLength": 12}),
        "spec.data.cleaning.minMeanWordLength",
    ),
    (
        "contradiction: one port for two servers",
        put("spec.workers.metricsPort", 29500),
        "spec.workers.metricsPort",
    ),
    (
        "contradiction: one-pod volume for a gang",
        both(
            put("spec.storage.accessMode", "ReadWriteOncePod"),
            put("spec.workers.numNodes", 2),
            put("spec.training.globalBatchSize", 16),
        ),
        "spec.storage.accessMode",
    ),
    (
        "exit code out of range",
        put("spec.runPolicy.exitCodeRules", [{"action": "Fail", "exitCodes": [0]}]),
        "spec.runPolicy.exitCodeRules[0].exitCodes[0]",
    ),
    (
        "contradiction: a queue the coscheduler does not have",
        put("spec.scheduling", {"gangScheduler": "Coscheduling", "queueName": "team-a"}),
        "spec.scheduling.queueName",
    ),
    (
        "pattern: pod label value",
        put("spec.workers.podLabels", {"team": "a b"}),
        "spec.workers.podLabels.team",
    ),
    (
        "pattern: node selector value",
        put("spec.workers.nodeSelector", {"gpu": "-h100"}),
        "spec.workers.nodeSelector.gpu",
    ),
    ("pattern: queue name", put("spec.scheduling.queueName", "Team_A"), "spec.scheduling.queueName"),
    (
        "pattern: priority class name",
        put("spec.workers.priorityClassName", "High"),
        "spec.workers.priorityClassName",
    ),
    (
        "contradiction: a pretrained source and a shape",
        put("spec.model", {"pretrained": {"uri": "hf://org/model"}, "hiddenSize": 64}),
        "spec.model.pretrained",
    ),
    (
        "contradiction: LoRA settings without LoRA",
        put("spec.training.lora", {"rank": 8}),
        "spec.training.lora",
    ),
    (
        "contradiction: LoRA from scratch",
        put("spec.training.method", "LoRA"),
        "spec.training.method",
    ),
    (
        "contradiction: QLoRA without GPUs",
        both(
            put("spec.model.pretrained", {"uri": "hf://org/model"}),
            put("spec.training.method", "QLoRA"),
            put("spec.workers.gpusPerNode", 0),
        ),
        "spec.training.method",
    ),
    (
        "contradiction: supervised records from scratch",
        put("spec.data.format", {"type": "PromptCompletion"}),
        "spec.data.format.type",
    ),
    (
        "contradiction: a template format without a template",
        both(
            put("spec.model.pretrained", {"uri": "hf://org/model"}),
            put("spec.data.format", {"type": "Template"}),
        ),
        "spec.data.format.promptTemplate",
    ),
    (
        "contradiction: a template naming no field",
        both(
            put("spec.model.pretrained", {"uri": "hf://org/model"}),
            put("spec.data.format", {"type": "Template", "promptTemplate": "Label:"}),
        ),
        "spec.data.format.promptTemplate",
    ),
    (
        "unknown format field (strict)",
        put("spec.data.format", {"type": "Text", "answerField": "label"}),
        "spec.data.format.answerField",
    ),
    (
        "contradiction: a second tokenizer for a pretrained model",
        both(
            put("spec.model.pretrained", {"uri": "hf://org/model"}),
            put("spec.data.tokenizer.path", "/t/tokenizer.json"),
        ),
        "spec.data.tokenizer.path",
    ),
    (
        "contradiction: from-scratch regularisation on a pretrained model",
        both(
            put("spec.model.pretrained", {"uri": "hf://org/model"}),
            put("spec.training.regularization", {"dropout": 0.1}),
        ),
        "spec.training.regularization",
    ),
    (
        "pattern: model source scheme",
        put("spec.model.pretrained", {"uri": "ftp://host/model"}),
        "spec.model.pretrained.uri",
    ),
    (
        "contradiction: a revision of a path",
        put("spec.model.pretrained", {"uri": "models/base", "revision": "v1"}),
        "spec.model.pretrained.revision",
    ),
    (
        "contradiction: an env entry with value and valueFrom",
        put("spec.workers.env", [{"name": "K", "value": "v", "valueFrom": {"secretKeyRef": SECRET_KEY}}]),
        "spec.workers.env[0]",
    ),
    (
        "contradiction: valueFrom with both a Secret and a ConfigMap key",
        put(
            "spec.workers.env",
            [{"name": "K", "valueFrom": {"secretKeyRef": SECRET_KEY, "configMapKeyRef": SECRET_KEY}}],
        ),
        "spec.workers.env[0].valueFrom",
    ),
    (
        "contradiction: valueFrom naming nothing",
        put("spec.workers.env", [{"name": "K", "valueFrom": {}}]),
        "spec.workers.env[0].valueFrom",
    ),
    (
        "contradiction: envFrom with both a Secret and a ConfigMap",
        put("spec.workers.envFrom", [{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]),
        "spec.workers.envFrom[0]",
    ),
    (
        "contradiction: envFrom naming nothing",
        put("spec.workers.envFrom", [{"prefix": "X_"}]),
        "spec.workers.envFrom[0]",
    ),
    (
        "contradiction: a volume with two sources",
        put("spec.workers.volumes", [{**VOLUME, "configMap": {"name": "c"}}]),
        "spec.workers.volumes[0]",
    ),
    (
        "contradiction: a volume without a source",
        put("spec.workers.volumes", [{"name": "data", "mountPath": "/mnt/data"}]),
        "spec.workers.volumes[0]",
    ),
    (
        "contradiction: a volume named like the operator's own",
        put("spec.workers.volumes", [{**VOLUME, "name": "storage"}]),
        "spec.workers.volumes[0].name",
    ),
    (
        "contradiction: a volume mounted over the job's volume",
        put("spec.workers.volumes", [{**VOLUME, "mountPath": "/var/lib/llmop/data"}]),
        "spec.workers.volumes[0].mountPath",
    ),
    (
        "contradiction: a volume mounted above the config",
        put("spec.workers.volumes", [{**VOLUME, "mountPath": "/etc"}]),
        "spec.workers.volumes[0].mountPath",
    ),
    (
        "contradiction: two volumes of one name",
        put("spec.workers.volumes", [VOLUME, {**VOLUME, "mountPath": "/mnt/other"}]),
        "spec.workers.volumes",
    ),
    (
        "contradiction: two volumes on one path",
        put("spec.workers.volumes", [VOLUME, {**VOLUME, "name": "other"}]),
        "spec.workers.volumes",
    ),
    (
        "unknown enum: volume stage",
        put("spec.workers.volumes", [{**VOLUME, "stages": ["Export"]}]),
        "spec.workers.volumes[0].stages[0]",
    ),
    (
        "pattern: object store endpoint with credentials",
        put("spec.storage.objectStore", {"endpoint": "http://key:secret@minio:9000"}),
        "spec.storage.objectStore.endpoint",
    ),
    (
        "contradiction: remote storage that is not an object store",
        put("spec.storage.remote", {"uri": "/mnt/backup/run"}),
        "spec.storage.remote.uri",
    ),
    (
        "contradiction: remote storage with credentials in the URL",
        put("spec.storage.remote", {"uri": "s3://key:secret@bucket/run"}),
        "spec.storage.remote.uri",
    ),
    (
        "contradiction: resumeFrom a hub repository",
        put("spec.training.checkpointing", {"resumeFrom": "hf://org/model"}),
        "spec.training.checkpointing.resumeFrom",
    ),
    ("unknown field (strict)", put("spec.training.learningRate", 0.001), "spec.training.learningRate"),
    ("unknown top-level spec field (strict)", put("spec.epochs", 3), "spec.epochs"),
    ("name too long for derived pod names", put("metadata.name", "x" * 41), "metadata.name"),
]


def _apply(cluster: Cluster, namespace: str, manifest: Manifest) -> tuple[int, str]:
    proc = cluster.kubectl(
        "create", "--validate=strict", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False
    )
    return proc.returncode, proc.stderr.strip()


@pytest.mark.cluster
@pytest.mark.parametrize(("case", "change", "field"), CASES, ids=[c[0] for c in CASES])
def test_invalid_manifest_rejected_naming_field(
    cluster: Cluster, namespace: str, case: str, change: Callable[[Manifest], None], field: str
) -> None:
    manifest = base()
    change(manifest)
    code, message = _apply(cluster, namespace, manifest)
    print(f"\n[{case}] " + " ".join(message.split()))
    assert code != 0, f"{case}: the apiserver accepted it"
    assert field in message, f"{case}: rejection does not name {field}: {message}"
    # Nothing was created.
    assert "bad" not in cluster.kubectl("get", "llmtrainingjobs", "-n", namespace, "-o", "name").stdout


# metadata belongs to the apiserver; the trainer only ever reads the spec.
SPEC_CASES = [c for c in CASES if c[2].startswith("spec.")]

# What the models say for each spec case: where (the error's loc, as a path under spec) and a
# fragment of the message. A cross-field rule is a validator on the enclosing model, so its loc is
# that model's and the message names the field; a loc is always the apiserver's field or above it.
MODEL_ERRORS: dict[str, tuple[str, str]] = {
    "wrong type: string for integer": ("spec.training.maxSteps", "valid integer"),
    "wrong type: list for map": ("spec.workers.nodeSelector", "should be an object"),
    "wrong type: number for boolean": ("spec.data.cleaning.redactPii", "valid boolean"),
    "below minimum": ("spec.workers.numNodes", "greater than or equal to 1"),
    "above maximum": ("spec.deepspeed.zeroStage", "less than or equal to 3"),
    "exclusive minimum": ("spec.training.optimizer.learningRate", "greater than 0"),
    "fraction out of range": ("spec.data.sharding.validationFraction", "less than 0.5"),
    "unknown enum: precision": ("spec.training.precision", "'BF16', 'FP16' or 'FP32'"),
    "unknown enum: optimizer": ("spec.training.optimizer.type", "'AdamW', 'Adam' or 'SGD'"),
    "unknown enum: restart policy": ("spec.runPolicy.restartPolicy", "'OnFailure', 'Never' or 'ExitCode'"),
    "unknown enum: quantisation": ("spec.compression.quantization[0].method", "'Int8WeightOnly'"),
    "pattern: access mode": ("spec.storage.accessMode", "ReadWriteMany|ReadWriteOnce|ReadWriteOncePod"),
    "missing required: training": ("spec.training", "Field required"),
    "missing required: data": ("spec.data", "Field required"),
    "missing required: source uri": ("spec.data.sources[0].uri", "Field required"),
    "contradiction: batch sizes do not divide": (
        "spec",
        "training.globalBatchSize must be a multiple of training.microBatchSize x the data-parallel size",
    ),
    "mesh: world not a multiple of the model-parallel size": (
        "spec",
        "workers.numNodes x workers.procsPerNode must be a multiple of parallelism tensor x pipeline",
    ),
    "mesh: batch does not divide over the data-parallel replicas": (
        "spec",
        "training.globalBatchSize must be a multiple of training.microBatchSize x the data-parallel size",
    ),
    "mesh: tensor parallel across nodes": ("spec", "parallelism.tensor must divide workers.procsPerNode"),
    "mesh: tensor parallel splitting a key/value head": (
        "spec",
        "parallelism.tensor must divide model.numHeads and model.numKeyValueHeads",
    ),
    "mesh: tensor parallel with ZeRO-3": ("spec", "does not combine with ZeRO-3"),
    "mesh: tensor parallel with an L1 penalty": (
        "spec",
        "does not combine with training.sparsity or L1/L2 regularization",
    ),
    "mesh: pipeline parallel with tied embeddings": ("spec", "needs model.tieEmbeddings false"),
    "contradiction: optimizer offload without ZeRO": (
        "spec.deepspeed",
        "offloadOptimizer needs zeroStage 1, 2 or 3",
    ),
    "contradiction: parameter offload below ZeRO 3": (
        "spec.deepspeed",
        "offloadParameters needs zeroStage 3",
    ),
    "contradiction: both maxSteps and maxTokens": (
        "spec.training",
        "exactly one of maxSteps or maxTokens must be set",
    ),
    "contradiction: neither maxSteps nor maxTokens": (
        "spec.training",
        "exactly one of maxSteps or maxTokens must be set",
    ),
    "contradiction: sequence longer than context": (
        "spec",
        "training.sequenceLength must not exceed model.contextLength",
    ),
    "contradiction: heads do not divide width": ("spec.model", "hiddenSize must be divisible by numHeads"),
    "contradiction: processes vs GPUs": ("spec.workers", "procsPerNode must equal gpusPerNode"),
    "contradiction: sparsity ends before it starts": (
        "spec.training.sparsity",
        "endStep must be greater than startStep",
    ),
    "contradiction: prepare without sources": (
        "spec.data",
        "sources must list at least one input when prepare is true",
    ),
    "contradiction: group size on int8": (
        "spec.compression.quantization[0]",
        "groupSize applies only to Int4WeightOnly",
    ),
    "contradiction: synonyms without thesaurus": (
        "spec.data.augmentation",
        "synonymReplacement needs thesaurusPath",
    ),
    "contradiction: warmup longer than the run": (
        "spec.training",
        "lrSchedule.warmupSteps must not exceed maxSteps",
    ),
    "contradiction: warmup longer than the steps maxTokens gives": (
        "spec.training",
        "lrSchedule.warmupSteps must not exceed maxSteps (or the steps maxTokens gives)",
    ),
    "contradiction: sparsity target reached after the last step": (
        "spec.training",
        "sparsity.endStep must not exceed maxSteps",
    ),
    "contradiction: odd head dimension": ("spec.model", "the head dimension) must be even"),
    "contradiction: mean word length bounds cross": (
        "spec.data.cleaning",
        "minMeanWordLength must not exceed maxMeanWordLength",
    ),
    "contradiction: one port for two servers": ("spec.workers", "masterPort and metricsPort must differ"),
    "contradiction: one-pod volume for a gang": (
        "spec",
        "storage.accessMode ReadWriteOncePod lets one pod mount the volume",
    ),
    "exit code out of range": ("spec.runPolicy.exitCodeRules[0].exitCodes[0]", "greater than or equal to 1"),
    "contradiction: a queue the coscheduler does not have": (
        "spec.scheduling",
        "queueName applies to Kueue (gangScheduler None) or Volcano",
    ),
    "pattern: pod label value": ("spec.workers.podLabels.team", "String should match pattern"),
    "pattern: node selector value": ("spec.workers.nodeSelector.gpu", "String should match pattern"),
    "pattern: queue name": ("spec.scheduling.queueName", "String should match pattern"),
    "pattern: priority class name": ("spec.workers.priorityClassName", "String should match pattern"),
    "contradiction: a pretrained source and a shape": (
        "spec.model",
        "model.pretrained and the from-scratch shape",
    ),
    "contradiction: LoRA settings without LoRA": (
        "spec.training",
        "training.lora applies only to method LoRA",
    ),
    "contradiction: LoRA from scratch": ("spec", "LoRA and QLoRA adapt an existing model"),
    "contradiction: QLoRA without GPUs": ("spec", "training.method QLoRA needs GPUs"),
    "contradiction: supervised records from scratch": ("spec", "supervised types need model.pretrained"),
    "contradiction: a template format without a template": (
        "spec.data.format",
        "promptTemplate is required with type Template",
    ),
    "contradiction: a template naming no field": ("spec.data.format", "must name at least one record field"),
    "unknown format field (strict)": ("spec.data.format.answerField", "Extra inputs are not permitted"),
    "contradiction: a second tokenizer for a pretrained model": (
        "spec",
        "data.tokenizer.path cannot be used with model.pretrained",
    ),
    "contradiction: from-scratch regularisation on a pretrained model": (
        "spec",
        "apply to a model from scratch only",
    ),
    "pattern: model source scheme": ("spec.model.pretrained", "uri must be hf://ORG/NAME"),
    "contradiction: a revision of a path": ("spec.model.pretrained", "revision applies only to a hub source"),
    "contradiction: an env entry with value and valueFrom": (
        "spec.workers.env[0]",
        "an env entry takes value or valueFrom, not both",
    ),
    "contradiction: valueFrom with both a Secret and a ConfigMap key": (
        "spec.workers.env[0].valueFrom",
        "valueFrom needs exactly one of secretKeyRef and configMapKeyRef",
    ),
    "contradiction: valueFrom naming nothing": (
        "spec.workers.env[0].valueFrom",
        "valueFrom needs exactly one of secretKeyRef and configMapKeyRef",
    ),
    "contradiction: envFrom with both a Secret and a ConfigMap": (
        "spec.workers.envFrom[0]",
        "envFrom needs exactly one of secretRef and configMapRef",
    ),
    "contradiction: envFrom naming nothing": (
        "spec.workers.envFrom[0]",
        "envFrom needs exactly one of secretRef and configMapRef",
    ),
    "contradiction: a volume with two sources": (
        "spec.workers.volumes[0]",
        "a volume needs exactly one of persistentVolumeClaim, configMap and secret",
    ),
    "contradiction: a volume without a source": (
        "spec.workers.volumes[0]",
        "a volume needs exactly one of persistentVolumeClaim, configMap and secret",
    ),
    "contradiction: a volume named like the operator's own": (
        "spec.workers.volumes[0]",
        "volume names storage, config, tmp, shm are the operator's own",
    ),
    "contradiction: a volume mounted over the job's volume": (
        "spec.workers.volumes[0]",
        "mountPath must not be, contain or lie inside the operator's mounts",
    ),
    "contradiction: a volume mounted above the config": (
        "spec.workers.volumes[0]",
        "mountPath must not be, contain or lie inside the operator's mounts",
    ),
    "contradiction: two volumes of one name": (
        "spec.workers",
        "volumes need distinct names and distinct mountPaths",
    ),
    "contradiction: two volumes on one path": (
        "spec.workers",
        "volumes need distinct names and distinct mountPaths",
    ),
    "unknown enum: volume stage": (
        "spec.workers.volumes[0].stages[0]",
        "'Prepare', 'Train', 'Compress' or 'Serve'",
    ),
    "pattern: object store endpoint with credentials": (
        "spec.storage.objectStore.endpoint",
        "String should match pattern",
    ),
    "contradiction: remote storage that is not an object store": (
        "spec.storage.remote",
        "storage.remote.uri must be an object-store URL with a bucket",
    ),
    "contradiction: remote storage with credentials in the URL": (
        "spec.storage.remote",
        "credentials go in storage.objectStore.credentialsSecret",
    ),
    "contradiction: resumeFrom a hub repository": (
        "spec.training.checkpointing",
        "resumeFrom must be an object-store URL",
    ),
    "unknown field (strict)": ("spec.training.learningRate", "Extra inputs are not permitted"),
    "unknown top-level spec field (strict)": ("spec.epochs", "Extra inputs are not permitted"),
}


def test_every_spec_case_says_what_the_models_report() -> None:
    assert sorted(MODEL_ERRORS) == sorted(c[0] for c in SPEC_CASES)


@pytest.mark.parametrize(("case", "change", "field"), SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_trainer_models_reject_the_same(case: str, change: Callable[[Manifest], None], field: str) -> None:
    manifest = base()
    change(manifest)
    assert_models_reject(LLMTrainingJobSpec, manifest["spec"], case, *MODEL_ERRORS[case], field)


def test_valid_base_manifest_is_valid_for_the_models() -> None:
    LLMTrainingJobSpec.model_validate(base()["spec"])


def _prune_empty(value: Any) -> Any:
    if isinstance(value, dict):
        pruned = {k: _prune_empty(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in ({}, []) or k in _KEEP_EMPTY}
    if isinstance(value, list):
        return [_prune_empty(v) for v in value]
    return value


# Sections the apiserver defaults to {} (their inner defaults then fill them); empty maps/lists the
# user never set stay absent on the server.
_KEEP_EMPTY: set[str] = set()


def _contains(sub: Any, full: Any, path: str = "spec") -> None:
    if isinstance(sub, dict):
        for k, v in sub.items():
            assert k in full, f"{path}.{k} was dropped"
            _contains(v, full[k], f"{path}.{k}")
    elif isinstance(sub, list):
        assert len(sub) == len(full), f"{path} changed length"
        for i, (a, b) in enumerate(zip(sub, full, strict=True)):
            _contains(a, b, f"{path}[{i}]")
    else:
        assert sub == full, f"{path} changed: sent {sub!r}, stored {full!r}"


@pytest.mark.cluster
@pytest.mark.parametrize("example", ["minimal.yaml", "full.yaml", "finetune.yaml"])
def test_examples_accepted_unchanged_with_defaults(cluster: Cluster, namespace: str, example: str) -> None:
    manifest = yaml.safe_load((REPO / "examples" / example).read_text())
    cluster.kubectl("create", "--validate=strict", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))
    stored = cluster.kubectl_json("get", "llmtrainingjob", manifest["metadata"]["name"], "-n", namespace)
    # What the user wrote is stored as written ...
    _contains(manifest["spec"], stored["spec"])
    # ... and every default the models declare was filled in by the apiserver, no more, no less.
    expected = _prune_empty(LLMTrainingJobSpec.model_validate(copy.deepcopy(manifest["spec"])).to_wire())
    assert _prune_empty(stored["spec"]) == expected


# (case id, job name, what the apiserver's rejection says): each name is a valid object name or
# fails only on what its children need; the models' name_problem says why in the same words.
NAME_CASES: list[tuple[str, str, str]] = [
    ("dot", "my.job", "must be a DNS-1035 label"),
    ("uppercase", "My-job", "must be a DNS-1035 label"),
    ("leading digit", "1job", "must be a DNS-1035 label"),
    ("trailing dash", "job-", "must be a DNS-1035 label"),
    ("too long", "x" * (MAX_NAME_LENGTH + 1), f"may not be more than {MAX_NAME_LENGTH}"),
]


@pytest.mark.cluster
@pytest.mark.parametrize(("case", "name", "fragment"), NAME_CASES, ids=[c[0] for c in NAME_CASES])
def test_a_name_that_cannot_name_the_children_is_rejected(
    cluster: Cluster, namespace: str, case: str, name: str, fragment: str
) -> None:
    manifest = base()
    manifest["metadata"]["name"] = name
    code, message = _apply(cluster, namespace, manifest)
    message = " ".join(message.split())
    print(f"\n[{case}] {message}")
    assert code != 0, f"{case}: the apiserver accepted {name!r}"
    assert "metadata.name" in message and fragment in message, message
    if "DNS-1035" in fragment:
        assert "<name>-workers" in message, f"{case}: the message does not say which child: {message}"


@pytest.mark.parametrize(("case", "name", "fragment"), NAME_CASES, ids=[c[0] for c in NAME_CASES])
def test_the_operator_side_names_the_same_problem(case: str, name: str, fragment: str) -> None:
    problem = name_problem(name)
    assert problem is not None, f"{case}: name_problem admits {name!r}"
    assert "<name>-workers" in problem and "metadata.name" in problem, problem
    if "DNS-1035" in fragment:
        assert problem == NAME_RULE.message


def _running_job(cluster: Cluster, namespace: str) -> Manifest:
    manifest = base()
    manifest["metadata"]["name"] = "fixed"
    # Room for a second node, so the workers patch below fails only for being a change.
    manifest["spec"]["training"]["globalBatchSize"] = 16
    for _ in range(2):  # a second apply of the same manifest changes nothing and is admitted
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))
    return manifest


# A change to each section the operator cannot apply to a started job, valid on its own.
IMMUTABLE_PATCHES: dict[str, Manifest] = {
    "model": {"hiddenSize": 128},
    "data": {"cleaning": {"minWords": 5}},
    "training": {"maxSteps": 200},
    "deepspeed": {"zeroStage": 1},
    "parallelism": {"tensor": 2},
    "workers": {"numNodes": 2},
    "scheduling": {"queueName": "team-a"},
    "storage": {"size": "100Gi"},
}


def _patch(cluster: Cluster, namespace: str, spec: Manifest) -> tuple[int, str]:
    body = json.dumps({"spec": spec})
    proc = cluster.kubectl(
        "patch", "llmtrainingjob", "fixed", "-n", namespace, "--type=merge", "-p", body, check=False
    )
    return proc.returncode, " ".join(proc.stderr.split())


def test_every_immutable_section_has_a_patch() -> None:
    assert sorted(IMMUTABLE_PATCHES) == sorted(IMMUTABLE_SECTIONS)


@pytest.mark.cluster
def test_a_started_job_takes_only_changes_the_operator_can_apply(cluster: Cluster, namespace: str) -> None:
    _running_job(cluster, namespace)
    before = cluster.kubectl_json("get", "llmtrainingjob", "fixed", "-n", namespace)["spec"]
    refused = {}
    for section, change in IMMUTABLE_PATCHES.items():
        code, message = _patch(cluster, namespace, {section: change})
        print(f"\n[{section}] {message}")
        if code == 0 or f"spec.{section} is immutable: create a new job" not in message:
            refused[section] = message or "accepted"
    assert refused == {}, refused
    assert cluster.kubectl_json("get", "llmtrainingjob", "fixed", "-n", namespace)["spec"] == before
    # What the operator reads on every pass may change.
    for change in (
        {"runPolicy": {"suspend": True, "ttlSecondsAfterFinished": 60, "activeDeadlineSeconds": 600}},
        {"serving": {"enabled": True, "replicas": 2}},
        {"compression": {"quantization": [{"method": "Int8WeightOnly"}]}},
    ):
        code, message = _patch(cluster, namespace, change)
        assert code == 0, message
    after = cluster.kubectl_json("get", "llmtrainingjob", "fixed", "-n", namespace)["spec"]
    assert after["runPolicy"]["suspend"] is True and after["serving"]["replicas"] == 2
    assert after["compression"]["quantization"] == [{"method": "Int8WeightOnly"}]


@pytest.mark.cluster
def test_a_warmup_as_long_as_the_run_is_admitted(cluster: Cluster, namespace: str) -> None:
    # 99 steps and one token round up to 100 steps: the apiserver counts steps as the trainer does.
    manifest = base()
    manifest["metadata"]["name"] = "edge"
    manifest["spec"]["training"] = {"maxTokens": 99 * 8 * 256 + 1, "lrSchedule": {"warmupSteps": 100}}
    code, message = _apply(cluster, namespace, manifest)
    assert code == 0, message
    LLMTrainingJobSpec.model_validate(manifest["spec"])
