"""Sequence parallel (Ulysses) through the real trainer: `llmtrain train` on 2 CPU ranks (gloo).

The reference is pure data parallel on the same 2 ranks with the same spec and seed: 16 samples a
step, split over two model copies. sequence=2 keeps one copy on both ranks and splits every
sequence in two (each rank projects its half, attention all-to-alls heads for sequence), with all
16 samples accumulated. FP32: the two differ in summation order only (~1e-7 per step, carried
forward by the optimiser), inside 1e-4 over 50 steps; a slice with the wrong rotary positions, a
gradient counted twice, or ranks fed different samples are off by 1e-2 within a few steps.
(tests/trainer/test_parallel_sequence.py checks the module itself against one full-sequence rank.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmtrain.testing import debug_config
from tests.trainer.ranks import events, torchrun

pytestmark = pytest.mark.slow

STEPS = 50
TOLERANCE = 1e-4


def spec(mesh: dict[str, int]) -> dict[str, Any]:
    return {
        "model": {
            "hiddenSize": 64,
            "numLayers": 2,
            "numHeads": 4,
            "numKeyValueHeads": 2,
            "intermediateSize": 172,
        },
        "training": {
            "maxSteps": STEPS,
            "microBatchSize": 8,
            "globalBatchSize": 16,
            "logIntervalSteps": 1,
            "lrSchedule": {"warmupSteps": 5},
            "checkpointing": {"intervalSteps": STEPS},
            "evaluation": {"intervalSteps": 25},
        },
        "deepspeed": {"zeroStage": 1},
        "workers": {"procsPerNode": 2},
        "parallelism": mesh,
    }


def test_sequence_parallel_follows_the_data_parallel_curve(english_data: Path, tmp_path: Path) -> None:
    curves, logs = {}, {}
    for name, mesh in (("dp", {}), ("sp", {"sequence": 2})):
        log = tmp_path / name / "train.log"
        config = debug_config(tmp_path / name, english_data, spec(mesh))
        assert torchrun(config, log) == 0, log.read_text()[-4000:]
        curves[name] = {e["step"]: e["loss"] for e in events(log, "progress")}
        logs[name] = log
    dp, sp = curves["dp"], curves["sp"]
    assert sorted(dp) == sorted(sp) == list(range(1, STEPS + 1))
    diffs = [abs(sp[s] - dp[s]) / dp[s] for s in dp]
    print(
        f"\nloss step 1: dp {dp[1]:.6f} sp {sp[1]:.6f}; step {STEPS}: dp {dp[STEPS]:.6f} sp {sp[STEPS]:.6f}"
    )
    print(f"max relative loss difference over {STEPS} steps: {max(diffs):.2e}")
    assert dp[STEPS] < 0.85 * dp[1], "the reference trains"
    assert max(diffs) < TOLERANCE
    start = events(logs["sp"], "start")[0]
    assert start["mesh"] == "data=1 x tensor=1 x sequence=2" and start["gradient_accumulation"] == 2
    # The export is the whole model (Ulysses splits activations, not parameters).
    assert (tmp_path / "sp" / "output" / "model" / "model.safetensors").is_file()
