"""Pipeline parallel (DeepSpeed PipelineModule, 1F1B) through the real trainer on 2 CPU ranks (gloo).

The reference is pure data parallel on the same 2 ranks with the same spec and seed: the same
initial weights (every rank builds the whole model from the seed, then keeps its stage) and the same
16 samples per step. Data parallel splits them over two model copies (2 micro-batches of 4 each);
pipeline=2 feeds the one copy, split into two stages of two blocks, all 4 micro-batches through the
1F1B schedule. In FP32 they differ only in summation order (the gradient average over another
group): ~1e-7 per step, carried forward by the optimiser, well inside 1e-4 over 50 steps; a stage fed
other samples, or weights that were not the reference's, is off by 1e-2 within a few steps.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from llmtrain.testing import debug_config
from tests.trainer.ranks import events, torchrun

pytestmark = pytest.mark.slow

STEPS = 50
TOLERANCE = 1e-4


def spec(mesh: dict[str, int], steps: int = STEPS) -> dict[str, Any]:
    return {
        "model": {
            "hiddenSize": 64,
            "numLayers": 4,
            "numHeads": 4,
            "numKeyValueHeads": 2,
            "intermediateSize": 172,
            "tieEmbeddings": False,  # the embedding and the head sit on different stages
        },
        "training": {
            "maxSteps": steps,
            "microBatchSize": 4,
            "globalBatchSize": 16,
            "logIntervalSteps": 1,
            "lrSchedule": {"warmupSteps": 5},
            "checkpointing": {"intervalSteps": 25, "keepLast": 3},
            "evaluation": {"intervalSteps": steps},
        },
        "deepspeed": {"zeroStage": 1},
        "workers": {"procsPerNode": 2},
        "parallelism": mesh,
    }


def train(
    work: Path, data: Path, mesh: dict[str, int], steps: int = STEPS, log_name: str = "train.log"
) -> Path:
    log = work / log_name
    assert torchrun(debug_config(work, data, spec(mesh, steps)), log) == 0, log.read_text()[-4000:]
    return log


def curve(log: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events(log, "progress")}


def test_pipeline_parallel_follows_the_data_parallel_curve_resumes_and_exports_whole(
    english_data: Path, tmp_path: Path
) -> None:
    dp_log = train(tmp_path / "dp", english_data, {})
    work = tmp_path / "pp"
    pp_log = train(work, english_data, {"pipeline": 2})
    dp, pp = curve(dp_log), curve(pp_log)
    assert sorted(dp) == sorted(pp) == list(range(1, STEPS + 1))
    diffs = [abs(pp[s] - dp[s]) / dp[s] for s in dp]
    print(
        f"\nloss step 1: dp {dp[1]:.6f} pp {pp[1]:.6f}; step {STEPS}: dp {dp[STEPS]:.6f} pp {pp[STEPS]:.6f}"
    )
    print(f"max relative loss difference over {STEPS} steps: {max(diffs):.2e}")
    assert dp[STEPS] < 0.85 * dp[1], "the reference trains"
    assert max(diffs) < TOLERANCE

    start = events(pp_log, "start")[0]
    # 4 micro-batches a step through 2 stages: 1F1B idles each stage (2 - 1) / (4 + 2 - 1) of a step.
    assert start["mesh"] == "data=1 x tensor=1 x pipeline=2" and start["pipeline_bubble"] == 0.2
    dp_bytes = events(dp_log, "model_loaded")[0]["local_parameter_bytes"]
    pp_bytes = [e["local_parameter_bytes"] for e in events(pp_log, "model_loaded")]
    print(
        f"per-rank parameter bytes: dp {dp_bytes}, pp stages {pp_bytes} ({max(pp_bytes) / dp_bytes:.3f} of dp)"
    )
    assert max(pp_bytes) < 0.6 * dp_bytes
    # ZeRO-1's fp32 copy and AdamW's two moments of the rank's stage, over data-parallel ranks (2 for
    # dp, 1 for pp=2): measured on the optimizer's tensors.
    dp_opt = events(dp_log, "memory")[0]["optimizer_state_bytes"]
    pp_opt = events(pp_log, "memory")[0]["optimizer_state_bytes"]
    print(f"per-rank optimizer state bytes: dp {dp_opt}, pp stage 0 {pp_opt} ({pp_opt / dp_opt:.3f} of dp)")
    assert dp_opt == pytest.approx(3 * dp_bytes / 2, rel=0.01)
    assert pp_opt == pytest.approx(3 * pp_bytes[0], rel=0.01)

    # The export is the whole model in the Llama's names: both stages' layers, the weights the data
    # parallel run reached up to summation order.
    exported = load_file(work / "output" / "model" / "model.safetensors")
    reference = load_file(tmp_path / "dp" / "output" / "model" / "model.safetensors")
    assert sorted(exported) == sorted(reference)
    worst = max((exported[k] - reference[k]).abs().max().item() for k in reference)
    print(f"exported weights vs data parallel's: max abs diff {worst:.2e}")
    assert worst < 1e-4

    # Back to the step-25 checkpoint: the newer one removed, the same config run again.
    shutil.rmtree(work / "checkpoints" / f"step-{STEPS:08d}")
    (work / "checkpoints" / "latest").unlink(missing_ok=True)
    resumed_log = train(work, english_data, {"pipeline": 2}, log_name="resumed.log")
    assert events(resumed_log, "start")[0]["resumed_from"] == "step-00000025"
    resumed = curve(resumed_log)
    drift = max(abs(resumed[s] - pp[s]) / pp[s] for s in range(26, STEPS + 1))
    print(f"resumed at step 25 under pipeline=2: max relative loss difference {drift:.2e}")
    assert drift < TOLERANCE
