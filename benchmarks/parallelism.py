"""Data, tensor, pipeline and sequence parallel on CPU ranks: tokens/s and what one rank holds.

Each mesh is `llmtrain train` under torchrun on 2 CPU ranks (gloo, one thread each), FP32, AdamW,
ZeRO-1, the same model and global batch: a Llama of ~3.7M parameters (hidden 256, 4 layers, 8
heads, vocab 1024, untied), whose attention and MLP matrices are most of it, as in any large model.
Data parallel keeps a whole copy on each rank; tensor parallel (DeepSpeed AutoTP) halves every block
matrix and keeps the embedding, the head and the norms whole on both ranks; pipeline parallel keeps
half the layers per rank (rank 0: the embedding and two blocks); sequence parallel (Ulysses) keeps
the whole model and halves the activations. Per rank: parameter bytes (rank 0's `model_loaded`
event), optimizer-state bytes after the first step (its `memory` event: under ZeRO-1 an fp32 copy
and AdamW's two moments of the rank's parameters, partitioned over the data-parallel ranks, so a
mesh with fewer data-parallel ranks partitions them less) and peak resident memory. Tensor x pipeline needs 4 ranks: it runs in a second group beside data parallel on 4 ranks (2
samples a micro-batch there, 8 a step everywhere). The last
line is the tensor=2 per-rank parameter memory as a fraction of data parallel's.

    DS_ACCELERATOR=cpu python benchmarks/parallelism.py [--steps 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the trainer tests' torchrun and log reader
# Each group runs on its own number of ranks and is compared with data parallel on as many.
GROUPS: dict[int, dict[str, dict[str, int]]] = {
    2: {
        "data=2": {},
        "tensor=2": {"tensor": 2},
        "pipeline=2": {"pipeline": 2},
        "sequence=2": {"sequence": 2},
    },
    4: {
        "data=4": {},
        "tensor=2 x pipeline=2": {"tensor": 2, "pipeline": 2},
    },
}
WARMUP = 5


def spec(steps: int, mesh: dict[str, int], ranks: int) -> dict[str, Any]:
    return {
        "model": {
            "hiddenSize": 256,
            "numLayers": 4,
            "numHeads": 8,
            "numKeyValueHeads": 8,
            "intermediateSize": 688,
            "vocabSize": 1024,
            "contextLength": 128,
            "tieEmbeddings": False,
        },
        "training": {
            "maxSteps": steps,
            "sequenceLength": 128,
            # 8 samples a step at every mesh: 4 a micro-batch on 2 ranks, 2 on 4.
            "microBatchSize": 8 // ranks,
            "globalBatchSize": 8,
            "logIntervalSteps": 1,
            "lrSchedule": {"warmupSteps": 2},
            "checkpointing": {"intervalSteps": 100000},
            "evaluation": {"intervalSteps": 100000, "maxBatches": 1},
        },
        "deepspeed": {"zeroStage": 1},
        "workers": {"procsPerNode": ranks},
        "parallelism": mesh,
    }


def train(work: Path, data: Path, steps: int, mesh: dict[str, int], ranks: int) -> Path:
    """`llmtrain train` under torchrun on local ranks, as the trainer tests run it (tests/trainer/ranks.py)."""
    from llmtrain.testing import debug_config
    from tests.trainer.ranks import torchrun

    log = work / "train.log"
    rc = torchrun(debug_config(work, data, spec(steps, mesh, ranks)), log, timeout=900, nproc_per_node=ranks)
    if rc != 0:
        raise SystemExit(f"{mesh}: training failed (exit {rc}):\n{log.read_text()[-3000:]}")
    return log


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    from llmtrain.testing import license_documents, write_shards
    from tests.trainer.ranks import events

    rows: dict[int, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_shards(root / "data", license_documents(), vocab_size=1024)
        for ranks, meshes in GROUPS.items():
            rows[ranks] = {}
            for name, mesh in meshes.items():
                log = train(root / name.replace("=", "").replace(" ", ""), data, args.steps, mesh, ranks)
                loaded = events(log, "model_loaded")[0]
                memory = events(log, "memory")[0]  # after the first step: the optimizer state exists
                progress = [e for e in events(log, "progress") if e["step"] > WARMUP]
                rows[ranks][name] = {
                    "tokens_per_second": sum(e["tokens_per_second"] for e in progress) / len(progress),
                    "parameter_bytes": loaded["local_parameter_bytes"],
                    "optimizer_bytes": memory["optimizer_state_bytes"],
                    "peak_rss_bytes": loaded["peak_rss_bytes"],
                }
    for ranks, group in rows.items():
        print(
            f"{ranks} CPU ranks, FP32, ZeRO-1, global batch 8 x 128 tokens, {args.steps} steps"
            f" (mean after {WARMUP})"
        )
        print(
            f"{'mesh':<22} {'tokens/s':>10} {'params/rank':>12} {'vs dp':>6} {'optimizer/rank':>15}"
            f" {'vs dp':>6} {'peak RSS/rank':>14}"
        )
        dp = group[f"data={ranks}"]
        for name, r in group.items():
            print(
                f"{name:<22} {r['tokens_per_second']:>10,.0f} {r['parameter_bytes'] / 2**20:>10.2f}Mi"
                f" {r['parameter_bytes'] / dp['parameter_bytes']:>6.3f}"
                f" {r['optimizer_bytes'] / 2**20:>13.2f}Mi {r['optimizer_bytes'] / dp['optimizer_bytes']:>6.3f}"
                f" {r['peak_rss_bytes'] / 2**20:>12.0f}Mi"
            )
    for ranks, group in rows.items():
        dp = group[f"data={ranks}"]
        for name, r in group.items():
            if not name.startswith("data="):
                ratio = r["tokens_per_second"] / dp["tokens_per_second"]
                print(f"{name.replace('=', '').replace(' ', '')} tokens/s vs dp{ranks}: {ratio:.3f}")
    dp, tp = rows[2]["data=2"], rows[2]["tensor=2"]
    print(f"tp2 per-rank parameter memory vs dp: {tp['parameter_bytes'] / dp['parameter_bytes']:.3f}")


if __name__ == "__main__":
    main()
