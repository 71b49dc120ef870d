"""render_deepspeed_config: the DeepSpeed config the operator puts in the ConfigMap."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec
from llmop_contract.deepspeed import render_deepspeed_config


def spec(**sections: Any) -> LLMTrainingJobSpec:
    base: dict[str, Any] = {
        "data": {"sources": [{"uri": "builtin://english"}]},
        "training": {"maxSteps": 10, "microBatchSize": 2, "globalBatchSize": 32},
        "workers": {"numNodes": 2, "procsPerNode": 4, "gpusPerNode": 4},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return LLMTrainingJobSpec.model_validate(base)


@pytest.mark.parametrize(
    ("nodes", "procs", "micro", "global_batch", "accumulation"),
    [
        (2, 4, 2, 32, 2),  # 32 / (2 per process x 2 nodes x 4 processes)
        (1, 1, 8, 8, 1),  # one process, no accumulation
        (3, 2, 4, 96, 4),  # 96 / (4 x 3 x 2)
        (1, 2, 1, 64, 32),  # 64 / (1 x 1 x 2)
    ],
)
def test_batch_and_accumulation(
    nodes: int, procs: int, micro: int, global_batch: int, accumulation: int
) -> None:
    cfg = render_deepspeed_config(
        spec(
            training={"microBatchSize": micro, "globalBatchSize": global_batch},
            workers={"numNodes": nodes, "procsPerNode": procs, "gpusPerNode": procs},
        )
    )
    assert cfg["train_batch_size"] == global_batch
    assert cfg["train_micro_batch_size_per_gpu"] == micro
    assert cfg["gradient_accumulation_steps"] == accumulation


@pytest.mark.parametrize(
    ("tensor", "pretrained", "accumulation", "section"),
    [
        (1, False, 2, None),  # 8 replicas: 32 / (2 x 8)
        (2, False, 4, {"autotp_size": 2, "preset_model": "llama"}),  # 4 replicas of 2 processes
        (4, False, 8, {"autotp_size": 4, "preset_model": "llama"}),  # 2 replicas, one per node
        (2, True, 4, {"autotp_size": 2}),  # AutoTP recognises a Hugging Face model by its config
    ],
)
def test_tensor_parallel_counts_the_batch_over_replicas(
    tensor: int, pretrained: bool, accumulation: int, section: dict[str, Any] | None
) -> None:
    """What DeepSpeed is given per mesh: the global batch stays globalBatchSize, accumulation makes it
    up over the data-parallel replicas (DeepSpeed checks micro x accumulation x its data-parallel size,
    which the trainer's mesh groups make world / tensor)."""
    model = {"pretrained": {"uri": "/models/llama"}} if pretrained else {"numHeads": 8, "numKeyValueHeads": 4}
    cfg = render_deepspeed_config(
        spec(model=model, parallelism={"tensor": tensor}, deepspeed={"zeroStage": 1})
    )
    assert cfg["train_batch_size"] == 32 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == accumulation
    assert cfg.get("tensor_parallel") == section


@pytest.mark.parametrize(
    ("precision", "bf16", "fp16"), [("BF16", True, False), ("FP16", False, True), ("FP32", False, False)]
)
def test_precision(precision: str, bf16: bool, fp16: bool) -> None:
    cfg = render_deepspeed_config(spec(training={"precision": precision}))
    assert cfg["bf16"]["enabled"] is bf16
    assert cfg["fp16"]["enabled"] is fp16
    if fp16:
        assert cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage(stage: int) -> None:
    cfg = render_deepspeed_config(spec(deepspeed={"zeroStage": stage}))
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage
    assert ("overlap_comm" in zero) == (stage > 0)
    assert ("allgather_bucket_size" in zero) == (stage in (1, 2))
    assert ("stage3_prefetch_bucket_size" in zero) == (stage == 3)
    assert "offload_optimizer" not in zero and "offload_param" not in zero


def test_offload_and_communication() -> None:
    cfg = render_deepspeed_config(
        spec(
            deepspeed={
                "zeroStage": 3,
                "offloadOptimizer": "CPU",
                "offloadParameters": "CPU",
                "communication": {
                    "overlapComm": False,
                    "reduceBucketSize": 12345,
                    "allgatherBucketSize": 54321,
                },
            }
        )
    )
    zero = cfg["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert zero["overlap_comm"] is False
    assert zero["reduce_bucket_size"] == 12345
    assert zero["stage3_prefetch_bucket_size"] == 54321
    assert cfg["zero_force_ds_cpu_optimizer"] is False  # trainer may hand in a torch optimiser


def test_clipping_and_overrides_merge_last() -> None:
    cfg = render_deepspeed_config(
        spec(
            training={"gradientClipping": 0.5},
            deepspeed={
                "zeroStage": 2,
                "overrides": {"zero_optimization": {"round_robin_gradients": True}, "x": 1},
            },
        )
    )
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["round_robin_gradients"] is True
    assert cfg["zero_optimization"]["stage"] == 2  # nested dicts merge rather than replace
    assert cfg["x"] == 1


def test_renderer_does_not_import_torch() -> None:
    # The operator image has no torch; importing the renderer must not need it.
    code = "import sys, llmop_contract.deepspeed; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("world", "accumulation"), [(2, 4), (4, 2), (8, 1)])
def test_the_configmaps_config_is_fitted_to_the_running_world(world: int, accumulation: int) -> None:
    # An elastic gang (preferred 4 processes, 1..8 nodes) runs with the config rendered for numNodes.
    from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
    from llmtrain.train.engine import deepspeed_config

    job = spec(
        training={"microBatchSize": 2, "globalBatchSize": 16},
        workers={"numNodes": 4, "minNodes": 1, "maxNodes": 8, "procsPerNode": 1, "gpusPerNode": 1},
        deepspeed={"overrides": {"x": 1}},
    )
    rendered = render_deepspeed_config(job)
    assert rendered["gradient_accumulation_steps"] == 2
    for cfg in (TrainerConfig(spec=job, deepspeed_config=rendered), TrainerConfig(spec=job)):
        fitted = deepspeed_config(cfg, world)
        assert fitted["gradient_accumulation_steps"] == accumulation
        # What DeepSpeed checks: the global batch is micro-batch x accumulation x world, kept at 16.
        assert fitted["train_batch_size"] == 16 == 2 * accumulation * world
        assert fitted["x"] == 1 and fitted["zero_optimization"] == rendered["zero_optimization"]
    with pytest.raises(ValueError, match="not a multiple"):
        deepspeed_config(TrainerConfig(spec=job, deepspeed_config=rendered), 3)
