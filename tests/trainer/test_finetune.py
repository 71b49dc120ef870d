"""Fine-tuning pretrained Hugging Face checkpoints of five families, full and LoRA, on 2 ranks.

Every family gets one ZeRO-2 and one ZeRO-3 run, and both Full and LoRA are covered for each. A run
must lower the validation loss; its merged export must load with AutoModelForCausalLM and reproduce
the trainer's logits (the trainer writes them with LLMTRAIN_EXPORT_PROBE); a LoRA run's adapter must
load with peft onto the original base and agree with the merged export. Tolerance: 1e-4 absolute on
logits (FP32 training; what remains is summation order, observed <= 4e-7).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtrain import testing_hf
from tests.trainer.finetune_helpers import events, finetune_config, torchrun, write_hf_shards

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4
FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "gemma")
CASES = [
    ("llama", "Full", 2),
    ("llama", "LoRA", 3),
    ("qwen2", "Full", 3),
    ("qwen2", "LoRA", 2),
    ("mistral", "Full", 2),
    ("mistral", "LoRA", 3),
    ("gpt2", "Full", 3),
    ("gpt2", "LoRA", 2),
    ("gemma", "Full", 2),
    ("gemma", "LoRA", 3),
]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    tok = testing_hf.tokenizer(root / "tokenizer")
    for family in FAMILIES:
        testing_hf.checkpoint(family, root / family, seed=0, tokenizer_dir=tok)
    write_hf_shards(root / "data", tok)
    return root


def training(method: str, steps: int = 6, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "maxSteps": steps,
        "microBatchSize": 2,
        "globalBatchSize": 4,
        "method": method,
        "logIntervalSteps": 1,
        "lrSchedule": {"warmupSteps": 1},
        "evaluation": {"intervalSteps": steps, "maxBatches": 2},
        "checkpointing": {"intervalSteps": 3, "keepLast": 2},
        "optimizer": {"learningRate": 0.003 if method == "Full" else 0.01},
    }
    if method != "Full":
        out["lora"] = {"rank": 8, "alpha": 16, "dropout": 0.0}
    out.update(extra)
    return out


def logits(model: torch.nn.Module, probe: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=probe["inputs"], position_ids=probe["positions"]).logits
    return out.float()


@pytest.mark.parametrize(("family", "method", "zero"), CASES)
def test_finetune_family(family: str, method: str, zero: int, hub: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = finetune_config(tmp_path, hub / "data", hub / family, training(method), zero)
    log, probe_file = tmp_path / "train.log", tmp_path / "probe.pt"
    assert torchrun(config, log, LLMTRAIN_EXPORT_PROBE=str(probe_file)) == 0, log.read_text()[-3000:]
    val = [e["validation_loss"] for e in events(log, "validation")]
    loaded = events(log, "model_loaded")[0]
    assert loaded["family"] == family and loaded["method"] == method
    if method == "LoRA":
        assert 0 < loaded["trainable_parameters"] < loaded["parameters"] / 2
    assert val[-1] < val[0], val

    probe = torch.load(probe_file)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "output" / "model").eval()
    diff = (logits(merged, probe) - probe["logits"]).abs().max().item()
    line = (
        f"{family} {method} ZeRO-{zero}: val loss {val[0]:.4f} -> {val[-1]:.4f}; merged vs trainer {diff:.2e}"
    )
    assert diff < TOLERANCE
    if method == "LoRA":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(hub / family)
        adapted = PeftModel.from_pretrained(base, tmp_path / "output" / "adapter").eval()
        adiff = (logits(adapted, probe) - logits(merged, probe)).abs().max().item()
        line += f"; adapter vs merged {adiff:.2e}"
        assert adiff < TOLERANCE
        # The export really carries the training: the untouched base differs from it.
        assert (
            logits(AutoModelForCausalLM.from_pretrained(hub / family), probe) - probe["logits"]
        ).abs().max() > 1e-3
    print(line)


def test_lora_resume_matches_uninterrupted_run(hub: Path, tmp_path: Path) -> None:
    """Resuming LoRA (frozen base + adapters) from the step-3 checkpoint replays steps 4-6 exactly."""
    config = finetune_config(tmp_path, hub / "data", hub / "llama", training("LoRA"), 2)
    log = tmp_path / "train.log"
    assert torchrun(config, log) == 0, log.read_text()[-3000:]
    first = {e["step"]: e["loss"] for e in events(log, "progress")}
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000006")  # as if it crashed after step 3's save
    log2 = tmp_path / "resume.log"
    assert torchrun(config, log2) == 0, log2.read_text()[-3000:]
    start = events(log2, "start")[0]
    assert start["resumed_from"] == "step-00000003"
    again = {e["step"]: e["loss"] for e in events(log2, "progress")}
    assert sorted(again) == [4, 5, 6]
    rel = max(abs(again[s] - first[s]) / abs(first[s]) for s in again)
    print(f"LoRA resume from step 3: max relative loss difference {rel:.2e}")
    assert rel < 1e-5
