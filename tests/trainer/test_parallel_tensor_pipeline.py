"""Tensor x pipeline parallel (AutoTP inside DeepSpeed's PipelineModule) through the real trainer on 4
CPU ranks (gloo).

The reference is pure data parallel on the same 4 ranks with the same spec and seed: the same initial
weights and the same 16 samples per step. Data parallel splits them over four model copies (one
micro-batch of 4 each); tensor=2 x pipeline=2 feeds the one model replica all 4 micro-batches
through the 1F1B schedule, each of its two stages (two blocks) sharded over a tensor group of two
consecutive ranks. In FP32 they differ only in summation order (a matmul split in two and
all-reduced, the gradient average over another group): ~1e-7 per step, well inside 1e-4 over 20
steps; a stage fed other samples, stages whose weights were averaged together, or a mis-sharded layer
is off by 1e-2 within a few steps. The run's step-10 checkpoint (one model-states file per stage and
tensor rank, one layer file per layer and tensor rank) then resumes under the same mesh.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from llmtrain.testing import debug_config
from llmtrain.train.checkpoint import saved_mesh, tag_for
from tests.trainer.ranks import events, torchrun

pytestmark = pytest.mark.slow

STEPS = 20
TOLERANCE = 1e-4
RANKS = 4
HIDDEN, LAYERS = 64, 4
# One block's parameters: q and o (hidden^2), k and v (hidden x 2 kv heads x head dim 16), the three
# MLP matrices (hidden x 172) and two norms.
BLOCK = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * 32 + 3 * HIDDEN * 172 + 2 * HIDDEN


def spec(mesh: dict[str, int]) -> dict[str, Any]:
    return {
        "model": {
            "hiddenSize": HIDDEN,
            "numLayers": LAYERS,
            "numHeads": 4,
            "numKeyValueHeads": 2,
            "intermediateSize": 172,
            "tieEmbeddings": False,  # the embedding and the head sit on different stages
        },
        "training": {
            "maxSteps": STEPS,
            "microBatchSize": 4,
            "globalBatchSize": 16,
            "logIntervalSteps": 1,
            "lrSchedule": {"warmupSteps": 5},
            "checkpointing": {"intervalSteps": STEPS // 2, "keepLast": 2},
            "evaluation": {"intervalSteps": STEPS},
        },
        "deepspeed": {"zeroStage": 1},
        "workers": {"procsPerNode": RANKS},
        "parallelism": mesh,
    }


def train(work: Path, data: Path, mesh: dict[str, int]) -> Path:
    log = work / "train.log"
    code = torchrun(debug_config(work, data, spec(mesh)), log, timeout=480, nproc_per_node=RANKS)
    assert code == 0, log.read_text()[-4000:]
    return log


def curve(log: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events(log, "progress")}


def test_tensor_x_pipeline_follows_the_data_parallel_curve_on_a_quarter_of_the_blocks(
    english_data: Path, tmp_path: Path
) -> None:
    dp_log = train(tmp_path / "dp", english_data, {})
    work = tmp_path / "tpxpp"
    log = train(work, english_data, {"tensor": 2, "pipeline": 2})
    dp, tp = curve(dp_log), curve(log)
    assert sorted(dp) == sorted(tp) == list(range(1, STEPS + 1))
    diffs = [abs(tp[s] - dp[s]) / dp[s] for s in dp]
    print(
        f"\nloss step 1: dp {dp[1]:.6f} tp x pp {tp[1]:.6f}; step {STEPS}: dp {dp[STEPS]:.6f}"
        f" tp x pp {tp[STEPS]:.6f}"
    )
    print(f"max relative loss difference over {STEPS} steps: {max(diffs):.2e}")
    assert dp[STEPS] < 0.9 * dp[1], "the reference trains"
    assert max(diffs) < TOLERANCE

    start = events(log, "start")[0]
    # One replica: 4 micro-batches a step through 2 stages, 1F1B idles each (2 - 1) / (4 + 2 - 1).
    assert start["mesh"] == "data=1 x tensor=2 x pipeline=2" and start["pipeline_bubble"] == 0.2

    # Rank 0 (stage 0, tensor rank 0) holds half of its stage's block matrices, plus the whole
    # embedding and the norms, which AutoTP leaves replicated: its blocks are a quarter of dp's.
    dp_bytes = events(dp_log, "model_loaded")[0]["local_parameter_bytes"]
    rank0 = events(log, "model_loaded")[0]["local_parameter_bytes"]
    embedding = (start["parameters"] - LAYERS * BLOCK - HIDDEN) // 2 * 4  # FP32 bytes; the head's alike
    dp_blocks, blocks = dp_bytes - 2 * embedding - HIDDEN * 4, rank0 - embedding
    print(
        f"per-rank parameter bytes: dp {dp_bytes}, tp x pp rank 0 {rank0} ({rank0 / dp_bytes:.3f} of dp);"
        f" blocks only: dp {dp_blocks}, tp x pp rank 0 {blocks} ({blocks / dp_blocks:.3f} of dp)"
    )
    assert blocks == pytest.approx(dp_blocks / 4, rel=0.02)

    # The export is the whole model in the Llama's names: each stage's shards gathered whole.
    exported = load_file(work / "output" / "model" / "model.safetensors")
    reference = load_file(tmp_path / "dp" / "output" / "model" / "model.safetensors")
    assert sorted(exported) == sorted(reference)
    assert all(exported[k].shape == reference[k].shape for k in reference)
    worst = max((exported[k] - reference[k]).abs().max().item() for k in reference)
    print(f"exported weights vs data parallel's: max abs diff {worst:.2e}")
    assert worst < 1e-4

    # Resume under the same mesh from step 10: the checkpoint reads as tensor=2 x pipeline=2.
    checkpoints = work / "checkpoints"
    assert saved_mesh(checkpoints / tag_for(STEPS // 2)) == (2, 2)
    shutil.rmtree(checkpoints / tag_for(STEPS))
    (checkpoints / "latest").unlink(missing_ok=True)
    resumed_log = train(work, english_data, {"tensor": 2, "pipeline": 2})
    assert events(resumed_log, "start")[-1]["resumed_from"] == tag_for(STEPS // 2)
    resumed = {e["step"]: e["loss"] for e in events(resumed_log, "progress") if e["step"] > STEPS // 2}
    assert sorted(resumed) == list(range(STEPS // 2 + 1, STEPS + 1))
    worst_resumed = max(abs(resumed[s] - tp[s]) / tp[s] for s in resumed)
    print(
        f"resumed at step {STEPS // 2} under tensor=2 x pipeline=2: max relative loss difference {worst_resumed:.2e}"
    )
    assert worst_resumed < TOLERANCE
