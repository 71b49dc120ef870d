"""Render a job's DeepSpeed config from its spec.

Pure function of the spec, no torch import: the operator calls it to put the config into the job's
ConfigMap, and the trainer calls it when the ConfigMap carries none, so both always agree.
"""

from __future__ import annotations

import copy
from typing import Any

from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.training import Offload, Precision

# DeepSpeed prints its own progress every steps_per_print steps; the trainer logs progress itself.
_NEVER = 2**31 - 1


def gradient_accumulation_steps(spec: LLMTrainingJobSpec, world: int | None = None) -> int:
    """globalBatchSize / (microBatchSize x data-parallel size): admission guarantees it divides exactly
    at numNodes and minNodes, and an elastic gang runs only at sizes where it does. ``world``: the
    processes actually running (an elastic gang's current size); default numNodes x procsPerNode.
    The data-parallel size is the world over spec.parallelism's model-parallel size: every process of
    one model replica works on the same micro-batch."""
    if world is None:
        world = spec.workers.num_nodes * spec.workers.procs_per_node
    mesh = spec.parallelism
    if world % mesh.model_parallel:
        raise ValueError(
            f"world size {world} is not a multiple of parallelism tensor x pipeline x sequence ="
            f" {mesh.model_parallel}"
        )
    per_step = spec.training.micro_batch_size * mesh.data_parallel(world)
    if spec.training.global_batch_size % per_step:
        raise ValueError(
            f"training.globalBatchSize {spec.training.global_batch_size} is not a multiple of"
            f" microBatchSize x data-parallel size = {per_step}"
        )
    return spec.training.global_batch_size // per_step


def _tensor_parallel_section(spec: LLMTrainingJobSpec) -> dict[str, Any]:
    """DeepSpeed AutoTP training. A model from scratch is the project's Llama, whose projections carry
    Llama's names, so AutoTP's "llama" preset shards it (q/k/v/gate/up by column, o/down by row);
    a pretrained Hugging Face model is recognised by AutoTP from its own config."""
    section: dict[str, Any] = {"autotp_size": spec.parallelism.tensor}
    if spec.model.pretrained is None:
        section["preset_model"] = "llama"
    return section


def _zero_section(spec: LLMTrainingJobSpec) -> dict[str, Any]:
    ds = spec.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 0:
        return zero
    comm = ds.communication
    zero.update(
        overlap_comm=comm.overlap_comm,
        contiguous_gradients=comm.contiguous_gradients,
        reduce_bucket_size=comm.reduce_bucket_size,
    )
    if ds.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = comm.allgather_bucket_size
        zero["reduce_scatter"] = True
    else:
        # Stage 3 gathers parameters on demand; its prefetch bucket plays the all-gather bucket's role.
        zero["stage3_prefetch_bucket_size"] = comm.allgather_bucket_size
    if ds.offload_optimizer == Offload.CPU:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_parameters == Offload.CPU:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``over`` into a copy of ``base``; nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render_deepspeed_config(spec: LLMTrainingJobSpec) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``spec`` (``deepspeed.overrides`` merged last)."""
    tr = spec.training
    config: dict[str, Any] = {
        "train_batch_size": tr.global_batch_size,
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(spec),
        "gradient_clipping": tr.gradient_clipping,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": tr.precision == Precision.BF16},
        "fp16": {"enabled": tr.precision == Precision.FP16},
        "zero_optimization": _zero_section(spec),
        # The trainer builds the optimiser itself (torch AdamW/Adam/SGD, or DeepSpeedCPUAdam when
        # offloading and the op builds), so DeepSpeed must accept a client optimiser under ZeRO.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    if spec.parallelism.tensor > 1:
        config["tensor_parallel"] = _tensor_parallel_section(spec)
    if spec.parallelism.sequence > 1:
        # DeepSpeed Ulysses: the config counts world / sequence_parallel_size as the data-parallel
        # size in its batch identity (runtime/config.py) unless the trainer's mpu supplies it.
        config["sequence_parallel_size"] = spec.parallelism.sequence
    # Pipeline: the stage count goes to PipelineModule (built by the trainer from
    # spec.parallelism.pipeline); DeepSpeed's "pipeline" section defaults are right, so none is added.
    if tr.precision == Precision.FP16:
        # Dynamic loss scaling: start at 2^16, halve on overflow, grow after 1000 clean steps.
        config["fp16"].update(
            loss_scale=0, initial_scale_power=16, loss_scale_window=1000, hysteresis=2, min_loss_scale=1
        )
    return _merge(config, spec.deepspeed.overrides)
