"""Trainer step vs a bare PyTorch loop on CPU: same model, batch, threads, fp32, AdamW, one process.

The trainer side is the real `llmtrain train` loop (DeepSpeed engine, ZeRO 0, prefetching loader,
schedule, clipping) run in-process; the bare side is forward/backward/clip/AdamW on batches already in
memory. Each side runs twice, alternating, and keeps its faster median step time, so a noisy neighbour
on a shared machine penalises neither side more. The last line is the ratio of step times.

    DS_ACCELERATOR=cpu python benchmarks/trainer_cpu.py [--steps 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from llmtrain.adapt import llama_args
from llmtrain.config import load_config
from llmtrain.model import build_model
from llmtrain.testing import debug_config, license_documents, write_shards
from llmtrain.train.data import TokenStream, Windows, read_manifest, split_files
from llmtrain.train.engine import param_groups
from llmtrain.train.loop import run

WARMUP = 5
SPEC = {
    "model": {
        "hiddenSize": 256,
        "numLayers": 4,
        "numHeads": 8,
        "numKeyValueHeads": 8,
        "intermediateSize": 688,
        "vocabSize": 1024,
        "contextLength": 256,
    },
    "training": {
        "sequenceLength": 256,
        "microBatchSize": 8,
        "globalBatchSize": 8,
        "precision": "FP32",
        "optimizer": {"type": "AdamW", "learningRate": 1e-3, "weightDecay": 0.1},
        "lrSchedule": {"warmupSteps": 5},
        "gradientClipping": 1.0,
        "evaluation": {"intervalSteps": 100000, "maxBatches": 1},
        "checkpointing": {"intervalSteps": 100000},
        "logIntervalSteps": 100000,
    },
    "deepspeed": {"zeroStage": 0},
}


def trainer_step_seconds(work: Path, data: Path, steps: int) -> float:
    spec = {**SPEC, "training": {**SPEC["training"], "maxSteps": steps}}
    cfg = load_config(debug_config(work, data, spec))
    result = run(cfg)
    return statistics.median(result.step_seconds[WARMUP:])


def bare_step_seconds(data: Path, steps: int) -> float:
    cfg = yaml.safe_load(yaml.safe_dump(SPEC))
    config = load_config(debug_config(data.parent / "bare-cfg", data, cfg))
    tr = config.spec.training
    model = build_model(llama_args(config.spec.model), seed=tr.seed)
    opt = torch.optim.AdamW(
        param_groups(model, tr.optimizer.weight_decay),
        lr=tr.optimizer.learning_rate,
        betas=(tr.optimizer.beta1, tr.optimizer.beta2),
        eps=tr.optimizer.epsilon,
        # The optimizer the trainer builds (llmtrain.train.engine): the ratio is then the trainer's
        # overhead, not its choice of torch's fused kernel over the per-tensor default.
        fused=True,
    )
    m = read_manifest(data)
    windows = Windows(TokenStream(split_files(data, m, "train"), m.dtype), tr.sequence_length, tr.seed)
    order = windows.order(0)
    batches = [
        windows.batch([int(w) for w in order[i * tr.micro_batch_size : (i + 1) * tr.micro_batch_size]])
        for i in range(steps)
    ]
    times = []
    for x, y in batches:
        start = time.perf_counter()
        loss, _ = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr.gradient_clipping)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LLMOP_METRICS_PORT", "0")
    os.environ.setdefault("LLMTRAIN_LOG_FORMAT", "json")
    tokens = SPEC["training"]["microBatchSize"] * SPEC["training"]["sequenceLength"]  # type: ignore[index]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_shards(root / "data", license_documents(), vocab_size=1024)
        bare, ours = [], []
        for attempt in range(2):
            bare.append(bare_step_seconds(data, args.steps))
            ours.append(trainer_step_seconds(root / f"trainer-{attempt}", data, args.steps))
    b, t = min(bare), min(ours)
    print(
        f"threads={torch.get_num_threads()} tokens/step={tokens} steps={args.steps} (median after {WARMUP} warm-up)"
    )
    print(
        f"bare torch: {tokens / b:,.0f} tokens/s ({b * 1000:.1f} ms/step; runs {[round(x * 1000, 1) for x in bare]})"
    )
    print(
        f"trainer:    {tokens / t:,.0f} tokens/s ({t * 1000:.1f} ms/step; runs {[round(x * 1000, 1) for x in ours]})"
    )
    print(f"trainer/bare-torch time ratio: {t / b:.3f}")


if __name__ == "__main__":
    main()
