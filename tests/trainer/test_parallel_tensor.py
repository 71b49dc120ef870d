"""Tensor parallel (DeepSpeed AutoTP) through the real trainer: `llmtrain train` on 2 CPU ranks (gloo).

The reference is pure data parallel on the same 2 ranks with the same spec and seed, so the same
initial weights and the same 16 samples per step: DP=2 splits each step's samples over two model
copies (8 each); TP=2 feeds the one model copy, split over the two ranks, all 16 (2 micro-batches of
8, accumulated). In FP32 the two differ only in the order sums are taken (a matmul split in two and
all-reduced, the gradient average over a different group): relative loss differences of ~1e-7 per
step that the optimiser carries forward, well inside 1e-4 over 60 steps. A wrong data split (the
TP ranks reading different samples) or a mis-sharded layer is off by more than 1e-2 in a few steps.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from llmtrain.testing import debug_config
from tests.trainer.ranks import events, torchrun

pytestmark = pytest.mark.slow

STEPS = 60
TOLERANCE = 1e-4


def spec(mesh: dict[str, int], steps: int = STEPS, **training: Any) -> dict[str, Any]:
    return {
        "model": {
            "hiddenSize": 128,
            "numLayers": 2,
            "numHeads": 4,
            "numKeyValueHeads": 2,
            "intermediateSize": 344,
        },
        "training": {
            "maxSteps": steps,
            "microBatchSize": 8,
            "globalBatchSize": 16,
            "logIntervalSteps": 1,
            "lrSchedule": {"warmupSteps": 5},
            "checkpointing": {"intervalSteps": 30, "keepLast": 3},
            "evaluation": {"intervalSteps": steps},
            **training,
        },
        "deepspeed": {"zeroStage": 1},
        "workers": {"procsPerNode": 2},
        "parallelism": mesh,
    }


def train(tmp: Path, data: Path, mesh: dict[str, int], **extra: str) -> Path:
    log = tmp / "train.log"
    assert torchrun(debug_config(tmp, data, spec(mesh)), log, **extra) == 0, log.read_text()[-4000:]
    return log


def curve(log: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events(log, "progress")}


def test_tensor_parallel_follows_the_data_parallel_curve_exports_whole_and_resumes(
    english_data: Path, tmp_path: Path
) -> None:
    dp_log = train(tmp_path / "dp", english_data, {})
    probe = tmp_path / "probe.pt"
    tp_log = train(tmp_path / "tp", english_data, {"tensor": 2}, LLMTRAIN_EXPORT_PROBE=str(probe))
    dp, tp = curve(dp_log), curve(tp_log)
    assert sorted(dp) == sorted(tp) == list(range(1, STEPS + 1))
    diffs = [abs(tp[s] - dp[s]) / dp[s] for s in dp]
    print(
        f"\nloss step 1: dp {dp[1]:.6f} tp {tp[1]:.6f}; step {STEPS}: dp {dp[STEPS]:.6f} tp {tp[STEPS]:.6f}"
    )
    print(f"max relative loss difference over {STEPS} steps: {max(diffs):.2e}")
    assert dp[STEPS] < 0.8 * dp[1], "the reference trains"
    assert max(diffs) < TOLERANCE

    start = events(tp_log, "start")[0]
    assert start["mesh"] == "data=1 x tensor=2" and start["gradient_accumulation"] == 2
    assert events(dp_log, "start")[0]["mesh"] == "data=2 x tensor=1"
    # Per-rank parameter bytes: the attention and MLP matrices are halved, embeddings are not.
    dp_bytes = events(dp_log, "model_loaded")[0]["local_parameter_bytes"]
    tp_bytes = events(tp_log, "model_loaded")[0]["local_parameter_bytes"]
    print(f"per-rank parameter bytes: dp {dp_bytes}, tp {tp_bytes} ({tp_bytes / dp_bytes:.3f} of dp)")
    assert tp_bytes < 0.8 * dp_bytes
    # Optimizer state, measured on the tensors: ZeRO-1 keeps an fp32 copy of the rank's parameters and
    # AdamW's two moments, partitioned over the data-parallel ranks (2 for dp, 1 for tp=2).
    dp_opt = events(dp_log, "memory")[0]["optimizer_state_bytes"]
    tp_opt = events(tp_log, "memory")[0]["optimizer_state_bytes"]
    print(f"per-rank optimizer state bytes: dp {dp_opt}, tp {tp_opt} ({tp_opt / dp_opt:.3f} of dp)")
    assert dp_opt == pytest.approx(3 * dp_bytes / 2, rel=0.01)
    assert tp_opt == pytest.approx(3 * tp_bytes / 1, rel=0.01)

    # The export is the whole model in Hugging Face layout: transformers loads it and gives the
    # sharded trainer's logits.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tp" / "output" / "model").eval()
    saved = torch.load(probe)
    with torch.no_grad():
        logits = model(saved["inputs"]).logits
    diff = (logits - saved["logits"]).abs().max().item()
    print(f"exported model vs trainer logits: max abs diff {diff:.2e}")
    assert diff < 1e-4

    # Back to the step-30 checkpoint of the same run: the newer one removed, the same config again.
    work, whole = tmp_path / "tp", tp
    checkpoints = work / "checkpoints"
    shutil.rmtree(checkpoints / f"step-{STEPS:08d}")
    (checkpoints / "latest").unlink(missing_ok=True)
    second = work / "resumed.log"
    assert torchrun(debug_config(work, english_data, spec({"tensor": 2})), second) == 0, second.read_text()[
        -4000:
    ]
    assert events(second, "start")[0]["resumed_from"] == "step-00000030"
    resumed = curve(second)
    diffs = [abs(resumed[s] - whole[s]) / whole[s] for s in range(31, STEPS + 1)]
    print(f"\nresumed at step 30 under tensor=2: max relative loss difference {max(diffs):.2e}")
    assert max(diffs) < TOLERANCE


# Qwen2: tied embeddings, which AutoTP keeps whole (Llama untied and Mistral measured the same,
# 1.70e-07 each: docs/parallelism.md; left out for CI time).
@pytest.mark.parametrize("family", ["qwen2"])
def test_a_pretrained_model_trains_under_tensor_parallel_as_under_data_parallel(
    family: str, tmp_path: Path
) -> None:
    """Full fine-tuning of a Hugging Face checkpoint, which AutoTP recognises from its config."""
    from llmtrain import testing_hf
    from tests.trainer.finetune_helpers import finetune_config, write_hf_shards

    tok = testing_hf.tokenizer(tmp_path / "tokenizer")
    model_dir = testing_hf.checkpoint(family, tmp_path / family, seed=0, tokenizer_dir=tok)
    data = write_hf_shards(tmp_path / "data", tok)
    training = {
        "maxSteps": 8,
        "microBatchSize": 2,
        "globalBatchSize": 4,
        "logIntervalSteps": 1,
        "lrSchedule": {"warmupSteps": 1},
        "evaluation": {"intervalSteps": 8, "maxBatches": 2},
        "checkpointing": {"intervalSteps": 8},
    }
    curves = {}
    for name, mesh in (("dp", {}), ("tp", {"tensor": 2})):
        config = finetune_config(tmp_path / name, data, model_dir, training, zero=1)
        raw = yaml.safe_load(config.read_text())
        raw["spec"]["parallelism"] = mesh
        config.write_text(yaml.safe_dump(raw, sort_keys=False))
        log = tmp_path / name / "train.log"
        probe = tmp_path / name / "probe.pt"
        assert torchrun(config, log, LLMTRAIN_EXPORT_PROBE=str(probe)) == 0, log.read_text()[-4000:]
        curves[name] = curve(log)
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / name / "output" / "model").eval()
        saved = torch.load(probe)
        with torch.no_grad():
            logits = exported(input_ids=saved["inputs"], position_ids=saved["positions"]).logits
        assert (logits - saved["logits"]).abs().max().item() < 1e-4, f"{name} export"
    diffs = [abs(curves["tp"][s] - curves["dp"][s]) / curves["dp"][s] for s in curves["dp"]]
    print(
        f"\n{family} Full fine-tuning, tensor=2 vs data parallel: max relative loss difference {max(diffs):.2e}"
    )
    assert max(diffs) < TOLERANCE
