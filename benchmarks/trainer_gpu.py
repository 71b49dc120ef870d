"""Trainer throughput and MFU on one GPU: a ~316M-parameter Llama in BF16 (the issue's H100 figure).

    python benchmarks/trainer_gpu.py               # on a GPU machine: --preset 350m (default)
    python benchmarks/trainer_gpu.py --preset tiny # validates the whole path on CPU in a minute

It prepares the bundled corpus with the real data stage, runs `llmtrain train` exactly as a pod
does (one process, DeepSpeed, the job's config), reads the trainer's JSON progress lines and prints
tokens/s and MFU (PaLM formula against the device's peak; on CPU MFU is not reported). The last
line is `trainer tokens/s: X  MFU: Y`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

PRESETS: dict[str, dict[str, Any]] = {
    # hidden 1024 x 24 layers, SwiGLU 2816, 8k vocabulary: 316M parameters.
    "350m": {
        "model": {
            "hiddenSize": 1024,
            "numLayers": 24,
            "numHeads": 16,
            "intermediateSize": 2816,
            "vocabSize": 8192,
            "contextLength": 2048,
        },
        "training": {
            "sequenceLength": 2048,
            "microBatchSize": 8,
            "globalBatchSize": 8,
            "precision": "BF16",
            "maxSteps": 40,
        },
    },
    "tiny": {
        "model": {
            "hiddenSize": 128,
            "numLayers": 2,
            "numHeads": 4,
            "intermediateSize": 344,
            "vocabSize": 4096,
            "contextLength": 128,
        },
        "training": {
            "sequenceLength": 128,
            "microBatchSize": 8,
            "globalBatchSize": 8,
            "precision": "FP32",
            "maxSteps": 30,
        },
    },
}


def config(work: Path, preset: dict[str, Any]) -> Path:
    spec = {
        "model": preset["model"],
        "data": {"sources": [{"uri": "builtin://english"}], "sharding": {"validationFraction": 0.02}},
        "training": {
            **preset["training"],
            "optimizer": {"learningRate": 3e-4},
            "lrSchedule": {"warmupSteps": 5},
            "checkpointing": {"intervalSteps": 100000},
            "evaluation": {"intervalSteps": 100000, "maxBatches": 1},
            "logIntervalSteps": 5,
        },
        "deepspeed": {"zeroStage": 0},
        "workers": {"numNodes": 1, "procsPerNode": 1, "gpusPerNode": 0},
    }
    raw = {
        "apiVersion": "llmop.io/v1alpha1",
        "kind": "TrainerConfig",
        "run": {"jobName": "bench"},
        "paths": {
            "dataDir": str(work / "data"),
            "checkpointDir": str(work / "ckpt"),
            "outputDir": str(work / "out"),
        },
        "spec": spec,
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="350m")
    parser.add_argument("--steps", type=int, help="override maxSteps")
    parser.add_argument("--micro-batch", type=int, help="override microBatchSize (and globalBatchSize)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.steps:
        preset["training"]["maxSteps"] = args.steps
    if args.micro_batch:
        preset["training"]["microBatchSize"] = preset["training"]["globalBatchSize"] = args.micro_batch

    env = {**os.environ, "LLMTRAIN_LOG_FORMAT": "json", "LLMOP_METRICS_PORT": "0"}
    llmtrain = [sys.executable, "-m", "llmtrain.cli"]
    with tempfile.TemporaryDirectory(prefix="llmop-gpu-bench-") as tmp:
        cfg = config(Path(tmp), preset)
        subprocess.run([*llmtrain, "prepare", str(cfg)], env=env, check=True, stdout=subprocess.DEVNULL)
        proc = subprocess.run([*llmtrain, "train", str(cfg)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    start = next(r for r in records if r.get("event") == "start")
    progress = [r for r in records if r.get("event") == "progress"]
    # The first intervals include compilation and allocator warm-up.
    steady = progress[len(progress) // 2 :]
    tokens = statistics.median(r["tokens_per_second"] for r in steady)
    mfu = [r["mfu"] for r in steady if "mfu" in r]
    print(
        f"preset {args.preset}: {json.dumps({k: start[k] for k in start if k not in ('ts', 'event', 'rank')})}"
    )
    for r in progress:
        print(
            f"  step {r['step']:>4}  loss {r['loss']:.3f}  tokens/s {r['tokens_per_second']:.0f}  mfu {r.get('mfu', '-')}"
        )
    mfu_text = f"{statistics.median(mfu):.1%}" if mfu else "n/a (device peak unknown, e.g. CPU)"
    print(f"trainer tokens/s: {tokens:.0f}  MFU: {mfu_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
