"""`llmtrain export-onnx`: the graph runs under onnxruntime and gives the trained model's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.trainer.conftest import TrainedModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(trained_model: TrainedModel) -> Path:
    return trained_model.model_dir


def export(
    model_dir: Path, out: Path, *flags: str, termination: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if termination is not None:
        env["LLMOP_TERMINATION_LOG"] = str(termination)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "llmtrain.cli",
            "export-onnx",
            "--model-dir",
            str(model_dir),
            "--out",
            str(out),
            *flags,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_exported_graph_gives_pytorchs_logits_under_onnxruntime(model_dir: Path, tmp_path: Path) -> None:
    import onnxruntime
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, message = tmp_path / "onnx", tmp_path / "termination-log"
    proc = export(model_dir, out, "--tolerance", "1e-3", termination=message)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["max_abs_diff"] <= 1e-3
    assert report["exporter"] == "torch.onnx.export(dynamo=True)" and report["fallback_reason"] is None
    assert {(s["batch"], s["sequence"]) for s in report["samples"]} >= {(1, 1), (2, 128)}
    assert {"model.onnx", "tokenizer.json", "tokenizer_config.json", "config.json"} <= {
        p.name for p in out.iterdir()
    }
    summary = json.loads(message.read_text())
    assert summary["stage"] == "onnx" and summary["modelPath"] == str(out)
    assert set(summary["results"]) == {"maxAbsDiff", "tolerance", "sizeBytes", "seconds"}
    assert all(isinstance(v, float) for v in summary["results"].values())
    assert summary["results"]["sizeBytes"] == (out / "model.onnx").stat().st_size

    # Independently of the exporter's own check: new text, a left-padded batch, transformers as reference.
    tok = AutoTokenizer.from_pretrained(out)
    texts = ["Redistribution and use in source and binary forms, with or without", "You may"]
    ids = [tok.encode(t) for t in texts]
    width = max(map(len, ids))
    input_ids = np.array([[tok.pad_token_id] * (width - len(i)) + i for i in ids], dtype=np.int64)
    mask = np.array([[0] * (width - len(i)) + [1] * len(i) for i in ids], dtype=np.int64)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})
    hf: Any = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        for row, row_ids in enumerate(ids):  # each text alone, unpadded
            expected = hf(torch.tensor([row_ids])).logits[0].numpy()
            got = onnx_logits[row, width - len(row_ids) :]
            assert np.abs(got - expected).max() <= 1e-3
            assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_difference_over_the_tolerance_fails_the_export(model_dir: Path, tmp_path: Path) -> None:
    message = tmp_path / "termination-log"
    proc = export(model_dir, tmp_path / "onnx", "--tolerance", "1e-12", termination=message)
    assert proc.returncode == 1
    assert "differ from PyTorch by" in proc.stderr and "> tolerance 1e-12" in proc.stderr
    assert not message.exists(), "no success summary for a failed verification"
    assert json.loads((tmp_path / "onnx" / "report.json").read_text())["passed"] is False


def test_not_a_model_directory_is_a_configuration_error(tmp_path: Path) -> None:
    proc = export(tmp_path, tmp_path / "onnx")
    assert proc.returncode == 2 and "not a model directory" in proc.stderr


def test_falls_back_to_torchscript_and_says_why_when_dynamo_export_fails(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmtrain.serve import onnx_export

    real_export = torch.onnx.export

    def dynamo_broken(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated torch.export failure")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    report = onnx_export.export_onnx(model_dir, tmp_path / "onnx", tolerance=1e-3)
    assert report.exporter == "torch.onnx.export(dynamo=False)"
    assert report.fallback_reason == "RuntimeError: simulated torch.export failure"
    assert report.passed, report.samples
