"""A model really trained by the project learns a task it cannot do: supervised fine-tuning works.

The session's trained model (licence prose, 1.7M parameters) is asked which kind of source a passage
of the bundled corpus comes from (license / reference / library), answering after "Source:". Before
fine-tuning it has never seen the answer format; after a short full fine-tune on Template records
(loss on the answer only) it answers held-out passages from documents it never trained on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmtrain import testing_sft
from tests.trainer.conftest import TrainedModel, train_env


def _config(root: Path, model_dir: Path, train_file: Path) -> Path:
    raw = {
        "apiVersion": "llmop.io/v1alpha1",
        "kind": "TrainerConfig",
        "paths": {
            "volumeDir": str(root),
            "dataDir": str(root / "data"),
            "checkpointDir": str(root / "checkpoints"),
            "outputDir": str(root / "output"),
        },
        "spec": {
            "model": {"pretrained": {"uri": str(model_dir)}},
            "data": {
                "sources": [{"uri": str(train_file), "format": "JSONL"}],
                "format": {**testing_sft.data_format(), "packing": "Padded"},
                "sharding": {"validationFraction": 0.05},
            },
            "training": {
                "maxSteps": 200,
                "sequenceLength": 128,
                "microBatchSize": 16,
                "globalBatchSize": 16,
                "precision": "FP32",
                "optimizer": {"learningRate": 0.002, "weightDecay": 0.0},
                "lrSchedule": {"warmupSteps": 10},
                "checkpointing": {"intervalSteps": 1000},
                "evaluation": {"intervalSteps": 100, "maxBatches": 4},
                "logIntervalSteps": 20,
            },
            "deepspeed": {"zeroStage": 0},
            "workers": {"numNodes": 1, "procsPerNode": 1, "gpusPerNode": 0},
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _llmtrain(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", *args],
        capture_output=True,
        text=True,
        env=train_env(),
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _answers(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    @torch.no_grad()
    def answer(prompt: str) -> str:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))

    return answer


@pytest.mark.timeout(1200)
def test_the_trained_model_learns_to_classify_passages(trained_model: TrainedModel, tmp_path: Path) -> None:
    train_file, test_file = testing_sft.write_classification(tmp_path / "records", words=16, per_class=240)
    held_out = [yaml.safe_load(line) for line in test_file.read_text().splitlines()]
    config = _config(tmp_path / "run", trained_model.model_dir, train_file)
    _llmtrain("prepare", str(config))
    _llmtrain("train", str(config))
    before = testing_sft.accuracy(held_out, _answers(trained_model.model_dir))
    after = testing_sft.accuracy(held_out, _answers(tmp_path / "run" / "output" / "model"))
    print(
        f"held-out accuracy on {len(held_out)} passages (3 classes): before {before:.3f}, after {after:.3f}"
    )
    assert before < 0.34, "the base model cannot do the task (it has never seen the answer format)"
    # Measured: 0.000 before, 0.792 after (chance is 1/3; the format alone gives at most that).
    assert after >= 0.6, "fine-tuning taught it the task, not only the answer format"
