"""Manifests built from a spec, without a cluster."""

from __future__ import annotations

from typing import Any

import yaml

from llmop import naming
from llmop.builders import JobRef, config, prepare, scheduling, storage, workers
from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig


def ref(**over: Any) -> JobRef:
    raw: dict[str, Any] = {
        "data": {"sources": [{"uri": "builtin://english"}]},
        "training": {"maxSteps": 10, "globalBatchSize": 16, "microBatchSize": 1},
        "workers": {"numNodes": 2, "procsPerNode": 8, "gpusPerNode": 8},
    }
    raw.update(over)
    return JobRef("llama", "team", "uid-1", LLMTrainingJobSpec.model_validate(raw))


def test_worker_pod_contract() -> None:
    pod = workers.build_worker(ref(), 1, attempt=3)
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert c["command"] == ["llmtrain"] and c["args"] == ["train", "/etc/llmop/config.yaml"]
    assert env["NODE_RANK"] == "1" and env["NNODES"] == "2" and env["LLMOP_ATTEMPT"] == "3"
    assert env["MASTER_ADDR"] == "llama-worker-0.llama-workers.team.svc"
    assert env["LLMOP_NODE_ADDR"] == "llama-worker-1.llama-workers.team.svc"  # c10d ranks nodes by it
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "8"
    assert pod["metadata"]["labels"][naming.ATTEMPT_LABEL] == "3"
    assert pod["spec"]["hostname"] == "llama-worker-1" and pod["spec"]["subdomain"] == "llama-workers"
    assert pod["spec"]["schedulingGates"] == [{"name": naming.GANG_GATE}]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_worker_zero_sorts_first_so_c10d_makes_it_group_rank_zero() -> None:
    """torchrun's c10d rendezvous gives group ranks in the sorted order of the nodes' --local_addr."""
    job = ref(
        workers={"numNodes": 128, "procsPerNode": 8, "gpusPerNode": 8},
        training={"maxSteps": 10, "globalBatchSize": 1024, "microBatchSize": 1},
    )
    names = [workers.worker_addr(job, i) for i in range(128)]
    assert min(names) == names[0] == workers.master_addr(job)
    assert len(set(names)) == 128


def test_kueue_plain_pod_group() -> None:
    pod = workers.build_worker(ref(scheduling={"queueName": "team-a"}), 0, attempt=1)
    labels, ann = pod["metadata"]["labels"], pod["metadata"]["annotations"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
    assert labels["kueue.x-k8s.io/pod-group-name"] == "llama-gang-1"
    assert ann["kueue.x-k8s.io/pod-group-total-count"] == "2"
    assert pod["spec"]["schedulingGates"] == [{"name": naming.KUEUE_GATE}]


def test_volcano_and_coscheduling_pod_groups() -> None:
    v = ref(scheduling={"gangScheduler": "Volcano"})
    group = scheduling.build_pod_group(v)
    assert (
        group is not None
        and group["spec"]["minMember"] == 2
        and group["spec"]["minResources"]["nvidia.com/gpu"] == "16"
    )
    pod = workers.build_worker(v, 0, 1)
    assert pod["spec"]["schedulerName"] == "volcano" and "schedulingGates" not in pod["spec"]
    c = ref(scheduling={"gangScheduler": "Coscheduling"})
    assert (
        workers.build_worker(c, 0, 1)["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "llama-gang"
    )
    assert scheduling.build_pod_group(ref()) is None


def test_config_map_round_trips_through_trainer_config() -> None:
    cm = config.build_config_map(ref())
    parsed = TrainerConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"]))
    assert parsed.spec == ref().spec
    assert parsed.deepspeed_config is not None
    assert parsed.deepspeed_config["train_batch_size"] == 16
    assert parsed.paths.checkpoint_dir == storage.CHECKPOINT_DIR


def test_claim_only_when_user_brings_none() -> None:
    assert storage.build_claim(ref())["spec"]["accessModes"] == ["ReadWriteMany"]  # type: ignore[index]
    assert storage.build_claim(ref(storage={"claimName": "shared"})) is None
    assert (
        storage.volumes(ref(storage={"claimName": "shared"}))[0]["persistentVolumeClaim"]["claimName"]
        == "shared"
    )


def test_prepare_job_has_no_gpus_and_runs_prepare() -> None:
    job = prepare.build_prepare_job(ref())
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][0] == "prepare" and "nvidia.com/gpu" not in str(c["resources"])
    assert "schedulingGates" not in job["spec"]["template"]["spec"]


def test_the_hub_token_reaches_only_the_stages_that_fetch_the_model() -> None:
    finetune = ref(
        model={"pretrained": {"uri": "hf://acme/base", "hub": {"tokenSecret": {"name": "hf", "key": "tok"}}}},
        training={"maxSteps": 10, "globalBatchSize": 16, "microBatchSize": 1, "method": "LoRA"},
    )
    token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}}}
    worker_env = workers.build_worker(finetune, 0, 1)["spec"]["containers"][0]["env"]
    prepare_env = prepare.build_prepare_job(finetune)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert token in worker_env and token in prepare_env
    assert "HF_TOKEN" not in str(workers.build_worker(ref(), 0, 1)), "no source, no token"
    parsed = TrainerConfig.model_validate(
        yaml.safe_load(config.build_config_map(finetune)["data"]["config.yaml"])
    )
    assert parsed.spec == finetune.spec
    assert parsed.paths.volume_dir == naming.STORAGE_MOUNT, "relative sources resolve on the job volume"
