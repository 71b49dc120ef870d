"""CPU generation speed, size and perplexity of a 70M-parameter Llama and of each compressed variant.

    DS_ACCELERATOR=cpu python benchmarks/compression.py [--work /tmp/llmop-compression-bench]

Trains the model briefly with `llmtrain train` on the licence-text shards (so perplexities mean
something), runs every `llmtrain compress` stage as a pod would, then loads all models and times
greedy generation from one prompt on one thread (``--threads``): a warm-up run per model, then
``--repeats`` rounds in which the models take turns, so a change in machine load hits every model
alike; tokens/s is from the median. One thread because on a shared machine a two-thread decoding
step waits whenever another process holds the second core, and the figures swing several-fold.
At this size one decoding step reads every weight once (281 MB in fp32), so memory bandwidth, not
arithmetic, bounds it and smaller weights should mean faster tokens. The last line is
`int8 speedup vs fp32: X` (int8 weight-only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from llmtrain.compress.load import load_model
from llmtrain.testing import debug_config, license_documents, write_shards

SPEC = {
    "model": {
        "hiddenSize": 1024,
        "numLayers": 6,
        "numHeads": 16,
        "intermediateSize": 2816,
        "vocabSize": 4096,
        "contextLength": 256,
    },
    "training": {
        "sequenceLength": 128,
        "microBatchSize": 4,
        "globalBatchSize": 4,
        "optimizer": {"learningRate": 0.0006},
        "lrSchedule": {"warmupSteps": 5},
        "evaluation": {"intervalSteps": 1000, "maxBatches": 8},
        "checkpointing": {"intervalSteps": 1000},
        "logIntervalSteps": 10,
    },
    "compression": {
        "quantization": [
            {"method": "Int8WeightOnly"},
            {"method": "Int8Dynamic"},
            {"method": "Int4WeightOnly", "groupSize": 64},
        ],
        "pruning": [
            {"method": "Magnitude", "sparsity": 0.5},
            {"method": "Structured", "sparsity": 0.5},
        ],
        "distillation": {
            "student": {"hiddenSize": 512, "numLayers": 4, "numHeads": 8, "intermediateSize": 1408},
            "steps": 40,
            "learningRate": 0.001,
            "temperature": 1.0,
            "alpha": 0.9,
        },
    },
}
STAGES = ["quantize-0", "quantize-1", "quantize-2", "prune-0", "prune-1", "distill"]


def run(cmd: list[str], env: dict[str, str]) -> None:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"  {' '.join(cmd[3:])}: {time.perf_counter() - started:.0f} s", flush=True)


@torch.no_grad()
def generate_seconds(model: Any, prompt: torch.Tensor, new_tokens: int) -> float:
    started = time.perf_counter()
    model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
    )
    return time.perf_counter() - started


def _median_us(fn: Any, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


@torch.no_grad()
def kernels() -> None:
    """One decoding step's matmul (1 token x 4096 x 4096): torchao 0.18's CPU paths vs PyTorch's kernels."""
    import copy

    from torch import nn
    from torchao.quantization import (  # type: ignore[import-untyped]
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )

    from llmtrain.compress.quantized import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear

    torch.manual_seed(0)
    linear = nn.Linear(4096, 4096, bias=False)
    x = torch.randn(1, 4096)
    fp32 = _median_us(lambda: linear(x))
    print(f"one token x [4096 x 4096] weight, {torch.get_num_threads()} thread(s), median of 30")
    print(f"{'path':<52}{'us':>10}{'vs fp32':>9}")
    print(f"{'fp32 nn.Linear':<52}{fp32:>10.0f}{1.0:>9.2f}")
    configs: list[tuple[str, Any, torch.dtype]] = [
        ("torchao Int8WeightOnlyConfig, fp32", Int8WeightOnlyConfig(), torch.float32),
        ("torchao Int8WeightOnlyConfig, bf16", Int8WeightOnlyConfig(), torch.bfloat16),
        (
            "torchao Int8DynamicActivationInt8WeightConfig",
            Int8DynamicActivationInt8WeightConfig(),
            torch.float32,
        ),
        ("torchao Int4WeightOnlyConfig(64), bf16", Int4WeightOnlyConfig(group_size=64), torch.bfloat16),
        (
            "torchao Int4WeightOnlyConfig(64, plain_int32)",
            Int4WeightOnlyConfig(group_size=64, int4_packing_format="plain_int32"),
            torch.bfloat16,
        ),
        (
            "torchao Int4WeightOnlyConfig(64, tile_packed_to_4d)",
            Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d"),
            torch.bfloat16,
        ),
        (
            "torchao IntxWeightOnlyConfig(int4)",
            IntxWeightOnlyConfig(weight_dtype=torch.int4),  # type: ignore[attr-defined]
            torch.float32,
        ),
    ]
    for name, config, dtype in configs:
        model = copy.deepcopy(linear).to(dtype)
        try:
            quantize_(model, config)
            us = _median_us(lambda m=model, d=dtype: m(x.to(d)))
            print(f"{name:<52}{us:>10.0f}{us / fp32:>9.2f}")
        except Exception as exc:  # report what this CPU cannot run, do not hide it
            print(f"{name:<52}  fails: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}")
    ours: list[tuple[str, nn.Module]] = [
        (
            "llmtrain Int8WeightOnlyLinear (_weight_int8pack_mm)",
            Int8WeightOnlyLinear.from_float(linear.weight),
        ),
        ("llmtrain Int8DynamicLinear (_int_mm)", Int8DynamicLinear.from_float(linear.weight)),
        (
            "llmtrain Int4WeightOnlyLinear (_weight_int4pack_mm)",
            Int4WeightOnlyLinear.from_float(linear.weight, 64),
        ),
    ]
    for name, module in ours:
        us = _median_us(lambda m=module: m(x))
        print(f"{name:<52}{us:>10.0f}{us / fp32:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/llmop-compression-bench", help="working directory")
    parser.add_argument("--train-steps", type=int, default=30, help="brief training of the fp32 model")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads while timing")
    parser.add_argument("--kernels", action="store_true", help="only compare the matmul kernels")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.kernels:
        kernels()
        return
    work = Path(args.work)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "NNODES", "NPROC_PER_NODE")}
    env.update(DS_ACCELERATOR="cpu", LLMOP_METRICS_PORT="0", LLMTRAIN_LOG_FORMAT="json")

    spec = json.loads(json.dumps(SPEC))
    spec["training"]["maxSteps"] = args.train_steps
    data_dir = work / "data"
    if not (data_dir / "manifest.json").exists():
        write_shards(data_dir, license_documents(), vocab_size=SPEC["model"]["vocabSize"])  # type: ignore[index]
    config = debug_config(work / "run", data_dir, spec)
    output = work / "run" / "output"
    print(
        f"torch {torch.__version__}, timing on {torch.get_num_threads()} thread(s); work dir {work}",
        flush=True,
    )
    if not (output / "model" / "model.safetensors").exists():
        run([sys.executable, "-m", "llmtrain.cli", "train", str(config)], env)
    for stage in STAGES:
        run([sys.executable, "-m", "llmtrain.cli", "compress", str(config), "--stage", stage], env)

    dirs = {"fp32": output / "model"} | {s: output / "compressed" / s for s in STAGES}
    reports = {s: json.loads((output / "compressed" / s / "report.json").read_text()) for s in STAGES}
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    models = {name: load_model(path) for name, path in dirs.items()}
    prompt = torch.from_numpy(np.fromfile(data_dir / "val-00000.bin", dtype="<u2")[:16].astype(np.int64))[
        None
    ]
    for model in models.values():
        generate_seconds(model, prompt, args.new_tokens)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    for r in range(args.repeats):
        # Each round starts with a different model, so no model always runs right after the same one.
        for name in order[r % len(order) :] + order[: r % len(order)]:
            times[name].append(generate_seconds(models[name], prompt, args.new_tokens))
    speed = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}

    base = reports[STAGES[0]]["baseline"]
    print()
    print(
        f"{'model':<34}{'size MB':>9}{'size':>7}{'params':>9}{'sparsity':>9}{'ppl':>9}{'Δppl':>8}{'tok/s':>8}{'speedup':>8}"
    )
    rows = [
        ("fp32", "trained model", base["sizeBytes"], base["parameters"], base["sparsity"], base["perplexity"])
    ]
    for s in STAGES:
        c = reports[s]["compressed"]
        rows.append(
            (s, reports[s]["method"], c["sizeBytes"], c["parameters"], c["sparsity"], c["perplexity"])
        )
    for name, method, size, params, sparsity, ppl in rows:
        print(
            f"{name + ' (' + method + ')':<34}{size / 1e6:>9.1f}{size / base['sizeBytes']:>7.2f}"
            f"{params / 1e6:>8.1f}M{sparsity:>9.2f}{ppl:>9.1f}{100 * (ppl / base['perplexity'] - 1):>7.1f}%"
            f"{speed[name]:>8.1f}{speed[name] / speed['fp32']:>8.2f}"
        )
    print()
    print(f"int8 speedup vs fp32: {speed['quantize-0'] / speed['fp32']:.2f}")


if __name__ == "__main__":
    main()
