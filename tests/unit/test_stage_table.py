"""pod.STAGES decides what each kind of pod gets of the user's spec; every builder follows it.

The five pod kinds (prepare Job, worker pods, compression Jobs and the ONNX export, the serving
Deployment, the KServe predictor) are built from one job that uses every part the table hands out:
env with Secret/ConfigMap keys, envFrom, object-store settings and credentials, per-stage volumes,
the hub token, placement and the priority class.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from llmop.builders import JobRef, Manifest, compress, pod, prepare, serving, storage, workers
from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.workload import Stage
from tests.unit.test_builders_stages import variant

MODEL = "/var/lib/llmop/output/model"
ENV = [
    {"name": "NCCL_DEBUG", "value": "WARN"},
    {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}},
    {"name": "RUN_TAG", "valueFrom": {"configMapKeyRef": {"name": "tags", "key": "run"}}},
]
ENV_FROM = [{"prefix": "HF_", "secretRef": {"name": "hub"}}, {"configMapRef": {"name": "nccl"}}]
VOLUMES = [
    {
        "name": "datasets",
        "mountPath": "/mnt/datasets",
        "stages": ["Prepare"],
        "persistentVolumeClaim": {"claimName": "corpus"},
    },
    {"name": "gcs-key", "mountPath": "/var/run/gcs", "secret": {"secretName": "gcs"}},
    {
        "name": "prompts",
        "mountPath": "/etc/prompts",
        "subPath": "chat",
        "readOnly": False,
        "stages": ["Compress", "Serve"],
        "configMap": {"name": "prompts"},
    },
    {
        "name": "teacher",
        "mountPath": "/mnt/models",
        "stages": ["Train", "Compress"],
        "persistentVolumeClaim": {"claimName": "models"},
    },
]
STORE = {
    "endpoint": "http://seaweed.store.svc:8333",
    "region": "eu-west-1",
    "addressingStyle": "Path",
    "credentialsSecret": "s3-keys",
}


def job(**workers_over: Any) -> JobRef:
    w: dict[str, Any] = {"env": ENV, "envFrom": ENV_FROM, "volumes": VOLUMES, **workers_over}
    name, raw = variant(workers=w, storage={"objectStore": STORE}, serving={"onnxExport": True})
    raw = copy.deepcopy(raw)
    return JobRef(name, "team", "uid-1", LLMTrainingJobSpec.model_validate(raw))


def pods(ref: JobRef) -> dict[str, tuple[Stage, Manifest]]:
    """Every kind of pod spec the job has, keyed by a readable name, with its table row."""
    out: dict[str, tuple[Stage, Manifest]] = {
        "prepare": (Stage.PREPARE, prepare.build_prepare_job(ref)["spec"]["template"]["spec"]),
        "worker": (Stage.TRAIN, workers.build_worker(ref, 1, 2)["spec"]),
        "serve": (Stage.SERVE, serving.build_deployment(ref, MODEL)["spec"]["template"]["spec"]),
        "kserve": (Stage.SERVE, serving.build_inference_service(ref, MODEL)["spec"]["predictor"]),
    }
    for st in [*compress.stages(ref.spec), compress.Stage(compress.ONNX, "ONNX", MODEL)]:
        out[f"compress-{st.name}"] = (
            Stage.COMPRESS,
            compress.build_compress_job(ref, st)["spec"]["template"]["spec"],
        )
    return out


def env(spec: Manifest) -> list[Manifest]:
    return list(spec["containers"][0]["env"])


def test_the_table_has_a_row_for_every_kind_of_pod() -> None:
    assert set(pod.STAGES) == set(Stage)
    assert {kind for kind, _ in pods(job()).values()} == set(Stage)


def test_the_prepare_job_gets_the_users_env_with_its_secret_and_config_map_keys() -> None:
    # The prepare Job used to drop workers.env: a corpus behind a Secret could not be read.
    spec = pods(job())["prepare"][1]
    assert env(spec)[-len(ENV) :] == ENV


def test_every_kind_of_pod_gets_env_env_from_and_the_object_store_settings() -> None:
    wanted_from = [{"secretRef": {"name": "s3-keys"}}, *ENV_FROM]  # the user's list after: it wins
    store = [
        {"name": "AWS_ENDPOINT_URL_S3", "value": STORE["endpoint"]},
        {"name": "AWS_DEFAULT_REGION", "value": STORE["region"]},
    ]
    for name, (_, spec) in pods(job()).items():
        c = spec["containers"][0]
        assert c["envFrom"] == wanted_from, name
        assert [e for e in env(spec) if e["name"].startswith("AWS_")] == store, name
        assert env(spec)[-len(ENV) :] == ENV, f"{name}: the user's variables come last"


def test_no_env_from_without_a_source() -> None:
    plain = variant(storage={"objectStore": {}})
    ref = JobRef(plain[0], "team", "uid-1", LLMTrainingJobSpec.model_validate(plain[1]))
    for name, (_, spec) in pods(ref).items():
        assert "envFrom" not in spec["containers"][0], name
        assert not [e for e in env(spec) if e["name"].startswith("AWS_")], name


@pytest.mark.parametrize("volume", [v["name"] for v in VOLUMES])
def test_a_volume_is_in_exactly_the_stages_it_names(volume: str) -> None:
    declared = next(v for v in VOLUMES if v["name"] == volume)
    stages = set(declared.get("stages") or [s.value for s in Stage])
    for name, (kind, spec) in pods(job()).items():
        mounts = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume]
        volumes = [v for v in spec["volumes"] if v["name"] == volume]
        if kind.value in stages:
            assert len(mounts) == 1 and len(volumes) == 1, name
            assert mounts[0]["mountPath"] == declared["mountPath"], name
            assert mounts[0]["readOnly"] is declared.get("readOnly", True), name
            assert mounts[0].get("subPath") == declared.get("subPath"), name
        else:
            assert mounts == [] and volumes == [], f"{volume} reached {name}"


def test_a_volume_limited_to_prepare_is_only_in_the_prepare_job() -> None:
    found = [
        name
        for name, (_, spec) in pods(job()).items()
        if any(v["name"] == "datasets" for v in spec["volumes"])
    ]
    assert found == ["prepare"]


def test_volume_sources_as_the_kubelet_needs_them() -> None:
    _, spec = pods(job())["compress-quantize-0"]
    by_name = {v["name"]: v for v in spec["volumes"]}
    # Secret files readable by the trainer's group (fsGroup 1000), not by everyone.
    assert by_name["gcs-key"]["secret"] == {"secretName": "gcs", "defaultMode": 0o440}
    assert spec["securityContext"]["fsGroup"] == pod.TRAINER_UID
    assert by_name["teacher"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert by_name["prompts"]["configMap"] == {"name": "prompts"}
    # The operator's own volumes are untouched and come first.
    assert spec["volumes"][: len(storage.volumes(job()))] == storage.volumes(job())


def test_the_hub_token_reaches_the_stages_the_table_says() -> None:
    ref = job()
    raw = ref.spec.to_wire()
    raw["model"] = {
        "pretrained": {"uri": "hf://acme/base", "hub": {"tokenSecret": {"name": "hf", "key": "tok"}}}
    }
    raw["training"] = {"maxSteps": 10, "globalBatchSize": 64, "microBatchSize": 1, "method": "LoRA"}
    raw["data"].pop("augmentation")
    raw["data"].pop("tokenizer")
    raw.pop("compression")
    finetune = JobRef(ref.name, ref.namespace, ref.uid, LLMTrainingJobSpec.model_validate(raw))
    token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}}}
    for name, (kind, spec) in pods(finetune).items():
        assert (token in env(spec)) is pod.STAGES[kind].hub_token, name
    assert pod.STAGES[Stage.PREPARE].hub_token and pod.STAGES[Stage.TRAIN].hub_token


def test_placement_and_priority_follow_the_table() -> None:
    ref = job()
    w = ref.spec.workers
    assert w.priority_class_name and w.tolerations and w.node_selector
    for name, (kind, spec) in pods(ref).items():
        assert spec["tolerations"] == [t.to_wire() for t in w.tolerations], name
        assert spec["nodeSelector"] == w.node_selector, name
        assert (spec.get("priorityClassName") == w.priority_class_name) is pod.STAGES[kind].priority, name


def test_same_spec_same_manifests() -> None:
    first, second = pods(job()), pods(job())
    assert first == second
