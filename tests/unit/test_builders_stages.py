"""What each stage's pod gets and what it must not get, for the examples and a few variants.

Every stage's pod shares the trainer's image, identity, hardening, volumes and placement; each adds
only its own part (the gang's rendezvous, the server's probes, ...). These tests pin both halves, so a
field added to one stage does not silently appear in another.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmop import naming
from llmop.builders import JobRef, Manifest, compress, prepare, serving, storage, workers
from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.data import PreparePhase
from llmop_contract.api.v1alpha1.workload import Stage

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RENDEZVOUS = ["MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "LLMOP_NODE_ADDR"]
GANG_ONLY_ENV = set(RENDEZVOUS) | {"LLMOP_ATTEMPT", "LLMOP_METRICS_PORT", "LLMOP_METRICS_ADDR"}
CACHES = ["HOME", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR"]
GANG_ONLY_POD = {"hostname", "subdomain", "schedulingGates", "schedulerName"}
MODEL = "/var/lib/llmop/output/quantize-0"


def example(name: str) -> tuple[str, dict[str, Any]]:
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    return doc["metadata"]["name"], doc["spec"]


def variant(**sections: Any) -> tuple[str, dict[str, Any]]:
    """examples/full.yaml with some sections replaced (None drops a section)."""
    name, raw = example("full.yaml")
    raw = copy.deepcopy(raw)
    for key, value in sections.items():
        if value is None:
            raw.pop(key, None)
        elif isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return name, raw


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "full": example("full.yaml"),
    "minimal": example("minimal.yaml"),
    "quickstart": example("quickstart.yaml"),
    "volcano": variant(scheduling={"gangScheduler": "Volcano", "queueName": "q"}),
    "coscheduling": variant(scheduling={"gangScheduler": "Coscheduling", "queueName": None}),
    "own-gate": variant(scheduling={"queueName": None, "schedulerName": "custom"}),
    "kserve": variant(serving={"kserve": True, "onnxExport": True}),
    "pod-metadata": variant(
        workers={
            "podLabels": {"team": "x"},
            "podAnnotations": {
                "sidecar.example/inject": "true",
                "logs.example/format": "json",
                "scheduling.k8s.io/group-name": "users-own-group",
            },
        }
    ),
    "cpu": variant(
        workers={"gpusPerNode": 0, "procsPerNode": 2, "priorityClassName": None, "affinity": None},
        compression=None,
    ),
    "own-claim": variant(storage={"claimName": "shared", "size": "1Gi"}),
    "distributed-prepare": variant(
        data={"prepare": True, "sources": [{"uri": "s3://corpus/"}], "distributed": {"pods": 4}}
    ),
    "secrets": variant(
        workers={
            "env": [
                {"name": "NCCL_DEBUG", "value": "WARN"},
                {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}},
                {"name": "RUN_TAG", "valueFrom": {"configMapKeyRef": {"name": "tags", "key": "run"}}},
            ],
            "envFrom": [{"configMapRef": {"name": "nccl"}}, {"prefix": "HF_", "secretRef": {"name": "hf"}}],
            "volumes": [
                {
                    "name": "datasets",
                    "mountPath": "/mnt/datasets",
                    "stages": ["Prepare"],
                    "persistentVolumeClaim": {"claimName": "datasets"},
                },
                {"name": "gcs-key", "mountPath": "/var/run/gcs", "secret": {"secretName": "gcs"}},
                {
                    "name": "prompts",
                    "mountPath": "/etc/prompts",
                    "subPath": "chat",
                    "readOnly": False,
                    "stages": ["Serve", "Compress"],
                    "configMap": {"name": "prompts"},
                },
            ],
        },
        storage={
            "objectStore": {
                "endpoint": "http://minio.store:9000",
                "region": "eu-west-1",
                "addressingStyle": "Path",
                "credentialsSecret": "s3-keys",
            },
        },
    ),
}


def job_ref(case: str) -> JobRef:
    name, raw = CASES[case]
    return JobRef(name, "team", "uid-1", LLMTrainingJobSpec.model_validate(raw))


def stage_pods(job: JobRef) -> dict[str, tuple[Manifest, Manifest]]:
    """Every pod the job can create, as (pod metadata, pod spec), keyed by stage."""
    pods: dict[str, tuple[Manifest, Manifest]] = {}
    for i, pod in enumerate(workers.build_gang(job, attempt=3)):
        pods[f"worker-{i}"] = (pod["metadata"], pod["spec"])

    def template(manifest: Manifest) -> tuple[Manifest, Manifest]:
        t = manifest["spec"]["template"]
        return t["metadata"], t["spec"]

    pods["prepare"] = template(prepare.build_prepare_job(job))
    if job.spec.compression is not None:
        for st in compress.stages(job.spec):
            pods[f"compress-{st.name}"] = template(compress.build_compress_job(job, st))
        onnx = compress.Stage(compress.ONNX, "ONNX", MODEL)
        pods["onnx"] = template(compress.build_compress_job(job, onnx))
    if job.spec.serving is not None:
        pods["serve"] = template(serving.build_deployment(job, MODEL))
        predictor = dict(serving.build_inference_service(job, MODEL)["spec"]["predictor"])
        predictor.pop("minReplicas")
        predictor.pop("maxReplicas")
        pods["kserve"] = ({}, predictor)
    return pods


def kind_of(stage: str) -> Stage:
    """The kind of pod (pod.STAGES' key) a stage_pods entry is."""
    if stage.startswith("worker-"):
        return Stage.TRAIN
    if stage == "prepare":
        return Stage.PREPARE
    return Stage.SERVE if stage in ("serve", "kserve") else Stage.COMPRESS


def env_of(container: Manifest) -> list[str]:
    return [e["name"] for e in container["env"]]


def user_env(job: JobRef) -> list[str]:
    return [e.name for e in job.spec.workers.env]


def shared_env(job: JobRef) -> list[str]:
    """What every stage's container ends with: the object-store settings, then the user's variables."""
    store = job.spec.storage.object_store
    return [
        *(["AWS_ENDPOINT_URL_S3"] if store.endpoint else []),
        *(["AWS_DEFAULT_REGION"] if store.region else []),
        *user_env(job),
    ]


def plain_leaves(value: Any, path: str = "$") -> list[str]:
    """Paths of values that are not plain JSON types (a StrEnum member would serialise differently)."""
    if type(value) is dict:
        out = [f"{path}: key {k!r}" for k in value if type(k) is not str]
        return out + [p for k, v in value.items() for p in plain_leaves(v, f"{path}.{k}")]
    if type(value) is list:
        return [p for i, v in enumerate(value) for p in plain_leaves(v, f"{path}[{i}]")]
    return [] if type(value) in (str, int, float, bool, type(None)) else [f"{path}: {type(value)}"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_stage_shares_image_identity_hardening_volumes_and_placement(case: str) -> None:
    job = job_ref(case)
    w = job.spec.workers
    for stage, (_, spec) in stage_pods(job).items():
        assert len(spec["containers"]) == 1, stage
        c = spec["containers"][0]
        assert (c["image"], c["imagePullPolicy"], c["command"]) == (
            w.image,
            w.image_pull_policy,
            ["llmtrain"],
        )
        extra = [v for v in w.volumes if v.mounted_in(kind_of(stage))]
        assert c["volumeMounts"][: len(storage.volume_mounts())] == storage.volume_mounts(), stage
        assert [m["name"] for m in c["volumeMounts"][len(storage.volume_mounts()) :]] == [
            v.name for v in extra
        ], stage
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }, stage
        assert spec["volumes"][: len(storage.volumes(job))] == storage.volumes(job), stage
        assert [v["name"] for v in spec["volumes"][len(storage.volumes(job)) :]] == [v.name for v in extra]
        assert spec["serviceAccountName"] == naming.service_account_name(job.name), stage
        assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["fsGroup"] == 1000
        assert spec.get("nodeSelector", {}) == w.node_selector, stage
        assert spec.get("tolerations", []) == [t.to_wire() for t in w.tolerations], stage
        assert spec.get("affinity") == w.affinity, stage
        assert "HOME" in env_of(c), stage
        # The user's variables come last in every stage, so they win over the operator's.
        assert env_of(c)[len(env_of(c)) - len(user_env(job)) :] == user_env(job), stage
        assert c["env"][len(c["env"]) - len(user_env(job)) :] == [e.to_wire() for e in w.env], stage


@pytest.mark.parametrize("case", sorted(CASES))
def test_worker_pods_carry_the_gang_and_nothing_else_does(case: str) -> None:
    job = job_ref(case)
    pods = stage_pods(job)
    for stage, (meta, spec) in pods.items():
        c = spec["containers"][0]
        if stage.startswith("worker-"):
            index = int(stage.removeprefix("worker-"))
            assert env_of(c)[: len(RENDEZVOUS)] == RENDEZVOUS and GANG_ONLY_ENV <= set(env_of(c))
            assert [p["name"] for p in c["ports"]] == ["rendezvous", "metrics"]
            assert spec["terminationGracePeriodSeconds"] == 120 and spec["restartPolicy"] == "Never"
            assert spec["hostname"] == naming.worker_name(job.name, index)
            assert spec["subdomain"] == naming.service_name(job.name)
            assert spec.get("priorityClassName") == job.spec.workers.priority_class_name
            assert meta["labels"][naming.ATTEMPT_LABEL] == "3"
            assert meta["labels"][naming.INDEX_LABEL] == str(index)
            assert meta["labels"][naming.ROLE_LABEL] == naming.ROLE_WORKER
            continue
        assert not GANG_ONLY_ENV & set(env_of(c)) - set(user_env(job)), stage
        assert not GANG_ONLY_POD & set(spec), stage
        assert naming.ATTEMPT_LABEL not in meta.get("labels", {}), stage
        labels = dict(meta.get("labels", {}))
        if stage == "serve" and (queue := job.spec.scheduling.kueue_queue):
            # Kueue admits each serving pod by its queue label (its Deployment integration).
            assert labels.pop(naming.KUEUE_QUEUE_LABEL) == queue
        assert not any(k.startswith(("kueue.", "scheduling.")) for k in labels), stage
        assert not any(k.startswith(("kueue.", "scheduling.")) for k in meta.get("annotations", {})), stage
        assert [p["name"] for p in c.get("ports", [])] == (["http"] if stage in ("serve", "kserve") else [])


@pytest.mark.parametrize("case", sorted(CASES))
def test_prepare_pod_is_cpu_only_with_its_own_short_environment(case: str) -> None:
    job = job_ref(case)
    meta, spec = stage_pods(job)["prepare"]
    c = spec["containers"][0]
    assert c["name"] == "prepare" and c["args"] == ["prepare", "/etc/llmop/config.yaml"]
    own = [{"name": "HOME", "value": "/tmp"}, {"name": "LLMOP_JOB_NAME", "value": job.name}]
    assert c["env"][:2] == own and env_of(c)[2:] == shared_env(job)
    requests = {k: str(v) for k, v in job.spec.workers.resources_per_node.requests.items()}
    assert c["resources"] == ({"requests": requests} if requests else {})  # no GPUs, no limits
    assert spec["restartPolicy"] == "Never" and spec["terminationGracePeriodSeconds"] == 120
    assert "priorityClassName" not in spec
    assert meta["labels"] == naming.common_labels(job.name, naming.ROLE_PREPARE)
    # The user's annotations (sidecars, log collection) as on every stage's pod, but not gang membership.
    wanted = {
        k: v
        for k, v in job.spec.workers.pod_annotations.items()
        if not k.startswith(("kueue.", "scheduling."))
    }
    assert meta.get("annotations", {}) == wanted


@pytest.mark.parametrize("case", sorted(c for c in CASES if job_ref(c).spec.compression is not None))
def test_compression_and_onnx_pods_keep_identity_caches_and_user_env(case: str) -> None:
    job = job_ref(case)
    assert job.spec.compression is not None
    res = job.spec.compression.resources
    resources: Manifest = {}
    if res.requests:
        resources["requests"] = {k: str(v) for k, v in res.requests.items()}
    if res.limits:
        resources["limits"] = {k: str(v) for k, v in res.limits.items()}
    pods = {k: v for k, v in stage_pods(job).items() if k.startswith("compress-") or k == "onnx"}
    assert pods
    for stage, (meta, spec) in pods.items():
        c = spec["containers"][0]
        assert c["name"] == "compress"
        assert env_of(c) == ["LLMOP_JOB_NAME", "LLMOP_JOB_NAMESPACE", *CACHES, *shared_env(job)], stage
        assert c["resources"] == resources
        assert spec["restartPolicy"] == "Never" and spec["terminationGracePeriodSeconds"] == 120
        assert spec.get("priorityClassName") == job.spec.workers.priority_class_name
        assert meta["labels"][naming.ROLE_LABEL] == naming.ROLE_COMPRESS
        # The user's annotations, but not gang membership: the Job is not part of the training gang.
        wanted = {
            k: v
            for k, v in job.spec.workers.pod_annotations.items()
            if not k.startswith(("kueue.", "scheduling."))
        }
        assert meta.get("annotations", {}) == wanted
        name = stage.removeprefix("compress-")
        assert meta["labels"][naming.STAGE_LABEL] == name
        if stage == "onnx":
            assert c["args"] == ["export-onnx", "--model-dir", MODEL, "--out", compress.ONNX_DIR]
        else:
            assert c["args"] == ["compress", "/etc/llmop/config.yaml", "--stage", name]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_stage_is_submitted_to_the_kueue_queue(case: str) -> None:
    """With a Kueue queue (and no other gang scheduler) every pod-creating stage is admitted by Kueue
    through the integration Kueue has for its kind; without one, nothing carries Kueue's labels."""
    job = job_ref(case)
    queue = job.spec.scheduling.kueue_queue
    batch_jobs = [prepare.build_prepare_job(job)]
    if job.spec.data.distributed is not None:
        batch_jobs += [prepare.build_phase_job(job, phase) for phase in PreparePhase]
    if job.spec.compression is not None:
        batch_jobs += [compress.build_compress_job(job, st) for st in compress.stages(job.spec)]
    for manifest in batch_jobs:
        # batch/Job integration: the label on the Job (Kueue suspends and resumes the Job itself).
        assert manifest["metadata"]["labels"].get(naming.KUEUE_QUEUE_LABEL) == queue
        assert naming.KUEUE_QUEUE_LABEL not in manifest["spec"]["template"]["metadata"]["labels"]
    for pod in workers.build_gang(job, attempt=3):
        labels, annotations = pod["metadata"]["labels"], pod["metadata"].get("annotations", {})
        assert labels.get(naming.KUEUE_QUEUE_LABEL) == queue
        # pod integration: one pod group per gang attempt, all its pods counted.
        group = naming.kueue_pod_group(job.name, 3) if queue else None
        assert labels.get(naming.KUEUE_POD_GROUP_LABEL) == group
        count = str(job.spec.workers.num_nodes) if queue else None
        assert annotations.get(naming.KUEUE_POD_GROUP_COUNT) == count
    if job.spec.serving is not None:
        deployment = serving.build_deployment(job, MODEL)
        assert deployment["metadata"]["labels"].get(naming.KUEUE_QUEUE_LABEL) == queue


def test_compression_stage_names_index_into_the_spec() -> None:
    names = [s.name for s in compress.stages(job_ref("full").spec)]
    assert names == ["quantize-0", "quantize-1", "prune-0", "distill"]
    assert [s.method for s in compress.stages(job_ref("quickstart").spec)] == ["Int8WeightOnly", "Magnitude"]
    assert compress.stages(job_ref("cpu").spec) == []


@pytest.mark.parametrize("case", sorted(c for c in CASES if job_ref(c).spec.serving is not None))
def test_serving_pods_get_probes_and_a_drain_and_no_trainer_environment(case: str) -> None:
    job = job_ref(case)
    pods = stage_pods(job)
    _, spec = pods["serve"]
    c = spec["containers"][0]
    assert c["name"] == "serve" and c["args"][:3] == ["serve", "--model-dir", MODEL]
    assert env_of(c) == ["POD_IP", "HOME", *shared_env(job)]
    assert {"startupProbe", "readinessProbe", "livenessProbe", "lifecycle"} <= set(c)
    assert spec["terminationGracePeriodSeconds"] == 35 and "restartPolicy" not in spec
    assert spec.get("priorityClassName") == job.spec.workers.priority_class_name
    _, predictor = pods["kserve"]
    k = predictor["containers"][0]
    assert k["name"] == "kserve-container" and k["args"][-2:] == ["--host", "127.0.0.1"]
    assert "readinessProbe" in k and not {"startupProbe", "livenessProbe", "lifecycle"} & set(k)
    assert "terminationGracePeriodSeconds" not in predictor and "restartPolicy" not in predictor
    assert {k: v for k, v in k.items() if k not in ("name", "args", "readinessProbe")} == {
        k: v
        for k, v in c.items()
        if k not in ("name", "args", "readinessProbe", "startupProbe", "livenessProbe", "lifecycle")
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_manifests_hold_only_plain_json_values(case: str) -> None:
    job = job_ref(case)
    for stage, (meta, spec) in stage_pods(job).items():
        assert plain_leaves(meta) + plain_leaves(spec) == [], stage


def test_a_user_variable_named_like_a_gang_variable_does_not_bring_the_gangs_value_along() -> None:
    # The compression pods once kept every worker variable whose name the user also set.
    name, raw = variant(workers={"env": [{"name": "NNODES", "value": "9"}]})
    job = JobRef(name, "team", "uid-1", LLMTrainingJobSpec.model_validate(raw))
    for stage, (_, spec) in stage_pods(job).items():
        env = spec["containers"][0]["env"]
        if not stage.startswith("worker-"):
            assert [e for e in env if e["name"] == "NNODES"] == [{"name": "NNODES", "value": "9"}], stage


def test_gang_scheduling_metadata_never_reaches_the_other_stages() -> None:
    for case in ("full", "volcano", "coscheduling"):  # Kueue, Volcano, coscheduling
        for stage, (meta, _) in stage_pods(job_ref(case)).items():
            if not stage.startswith("worker-"):
                assert "annotations" not in meta, (case, stage)


def test_worker_pod_spec_is_the_workers_spec() -> None:
    job = job_ref("full")
    assert workers.worker_pod_spec(job, 2, 5) == workers.build_worker(job, 2, attempt=5)["spec"]
    assert workers.worker_pod_spec(job)["containers"][0]["resources"] == workers.resources(job)
