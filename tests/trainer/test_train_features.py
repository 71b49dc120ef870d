"""One-process runs of `llmtrain train` exercising the optional features, and the metrics endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from llmtrain.adapt import llama_args
from llmtrain.config import load_config
from llmtrain.testing import debug_config, license_documents, write_shards
from llmtrain.train.metrics import flops_per_token

METRIC_NAMES = [
    "llmtrain_step",
    "llmtrain_total_steps",
    "llmtrain_tokens_total",
    "llmtrain_loss",
    "llmtrain_validation_loss",
    "llmtrain_tokens_per_second",
    "llmtrain_samples_per_second",
    "llmtrain_checkpoint_seconds",
    "llmtrain_memory_bytes",
    "llmtrain_eta_seconds",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("data"), license_documents()[:300])


def run_train(config: Path, **extra: str) -> tuple[int, list[dict[str, Any]], str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "NNODES", "NPROC_PER_NODE")}
    env.update(DS_ACCELERATOR="cpu", LLMTRAIN_LOG_FORMAT="json", LLMOP_METRICS_PORT="0", **extra)
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", "train", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, records, proc.stdout + proc.stderr


@pytest.mark.slow
def test_sparsity_penalty_checkpointing_bf16(data_dir: Path, tmp_path: Path) -> None:
    spec = {
        "training": {
            "maxSteps": 30,
            "precision": "BF16",
            "activationCheckpointing": True,
            "regularization": {"l2": 1e-4, "l1": 1e-6, "dropout": 0.1},
            "sparsity": {
                "enabled": True,
                "targetSparsity": 0.5,
                "startStep": 5,
                "endStep": 25,
                "frequency": 5,
            },
            "optimizer": {"type": "SGD", "learningRate": 0.3},
            "lrSchedule": {"type": "Linear", "warmupSteps": 3},
        },
        "deepspeed": {"zeroStage": 1},
    }
    rc, records, output = run_train(debug_config(tmp_path, data_dir, spec))
    assert rc == 0, output[-3000:]
    val = [r["validation_loss"] for r in records if r["event"] == "validation"]
    assert val[-1] < val[0]
    weights = load_file(str(tmp_path / "output" / "model" / "model.safetensors"))
    up = weights["model.layers.0.mlp.up_proj.weight"]
    assert up.dtype == torch.bfloat16
    assert (up == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert (weights["model.embed_tokens.weight"] == 0).float().mean().item() < 0.01  # never pruned


@pytest.mark.slow
def test_max_tokens_adam_constant_and_idempotent_restart(data_dir: Path, tmp_path: Path) -> None:
    spec = {
        "training": {
            "maxSteps": None,
            "maxTokens": 8 * 64 * 12,  # 12 steps of 8 x 64 tokens
            "optimizer": {"type": "Adam"},
            "lrSchedule": {"type": "Constant", "warmupSteps": 0},
            "checkpointing": {"intervalSteps": 5, "keepLast": 2},
        }
    }
    config = debug_config(tmp_path, data_dir, spec)
    rc, records, output = run_train(config)
    assert rc == 0, output[-3000:]
    assert next(r for r in records if r["event"] == "start")["total_steps"] == 12
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-00000010", "step-00000012"]  # keepLast 2, plus the final one
    # Starting again after completion resumes at the end, trains nothing and re-exports.
    rc, records, _ = run_train(config)
    assert rc == 0
    assert next(r for r in records if r["event"] == "start")["resumed_from"] == "step-00000012"
    assert not [r for r in records if r["event"] == "progress"]


def snapshot(port: int) -> dict[str, float]:
    """One scrape of the trainer's /metrics: series name -> value (the llmtrain_* series have no labels)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        line.split()[0]: float(line.split()[1])
        for line in body.splitlines()
        if line and not line.startswith("#")
    }


def disagreement(values: dict[str, float], records: list[dict[str, Any]], flops: float) -> str | None:
    """Why a scrape does not match what the trainer logged for the same step (None if it does)."""
    step = int(values["llmtrain_step"])
    progress = {r["step"]: r for r in records if r["event"] == "progress"}
    validation = {r["step"]: r for r in records if r["event"] == "validation"}
    logged, evaluated = progress.get(step), validation.get(int(values["llmtrain_validation_step"]))
    if logged is None or evaluated is None:
        return f"no progress/validation record for step {step}"
    expected = {
        # The log rounds the loss to 6 decimals and rates to 1, MFU to 4.
        "llmtrain_tokens_total": (step * 8 * 64, 0),  # globalBatchSize 8 x sequenceLength 64 per step
        "llmtrain_loss": (logged["loss"], 1e-6),
        "llmtrain_learning_rate": (logged["lr"], 0),
        "llmtrain_tokens_per_second": (logged["tokens_per_second"], 0.05),
        "llmtrain_eta_seconds": (logged["eta_seconds"], 0.05),
        "llmtrain_mfu": (logged["mfu"], 5e-5),
        "llmtrain_flops_per_second": (
            values["llmtrain_tokens_per_second"] * flops,
            1e-6 * values["llmtrain_flops_per_second"],
        ),
        "llmtrain_validation_loss": (evaluated["validation_loss"], 1e-6),
    }
    wrong = {k: (values[k], v) for k, (v, tol) in expected.items() if abs(values[k] - v) > tol * 1.0001}
    return f"step {step}: (scraped, logged) {wrong}" if wrong else None


@pytest.mark.slow
def test_metrics_served_during_training_are_the_trainers_figures(data_dir: Path, tmp_path: Path) -> None:
    config = debug_config(tmp_path, data_dir, {"training": {"maxSteps": 400, "logIntervalSteps": 1}})
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "NNODES", "NPROC_PER_NODE")}
    env.update(
        DS_ACCELERATOR="cpu", LLMTRAIN_LOG_FORMAT="json", LLMOP_METRICS_PORT="0", LLMOP_PEAK_FLOPS="1e12"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtrain.cli", "train", str(config)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    lines: list[dict[str, Any]] = []
    reader = threading.Thread(
        target=lambda: lines.extend(json.loads(x) for x in proc.stdout or [] if x.startswith("{")),
        daemon=True,
    )
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any(r["event"] == "progress" and r["step"] >= 3 for r in list(lines)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        port = next(r["port"] for r in lines if r["event"] == "metrics_listening")
        # A scrape can land between two of one step's gauge updates; five scrapes 0.1 s apart make
        # it next to impossible that all of them do, while a wrong figure is wrong in every one.
        scrapes = []
        for _ in range(5):
            scrapes.append(snapshot(port))
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    reader.join(30)
    assert proc.returncode == 75  # SIGTERM from a plain single process: checkpoint, then EX_TEMPFAIL
    for name in [*METRIC_NAMES, "llmtrain_mfu", "llmtrain_flops_per_second"]:
        assert name in scrapes[0], name
    values = scrapes[0]
    assert values["llmtrain_step"] >= 3 and values["llmtrain_total_steps"] == 400
    assert values["llmtrain_memory_bytes"] > 0 and values["llmtrain_tokens_per_second"] > 0
    assert 0 < values["llmtrain_mfu"] < 1
    flops = flops_per_token(llama_args(load_config(str(config)).spec.model), 64)
    reasons = [disagreement(v, lines, flops) for v in scrapes]
    print("scrapes at steps", [int(v["llmtrain_step"]) for v in scrapes], "disagreements", reasons)
    assert None in reasons, reasons
