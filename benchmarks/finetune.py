"""LoRA fine-tune on CPU: llmtrain (`llmtrain prepare` + `llmtrain train`) vs TRL's SFTTrainer with peft.

Both fine-tune the same local Hugging Face checkpoint (a Llama built with transformers' LlamaConfig and
saved with the testing_hf tokenizer; nothing is downloaded) on the same plain-text records (the licence
corpus), as packed 256-token windows, batch 8, the same steps, learning rate, cosine schedule with
warmup and a 10% floor, AdamW betas, clipping, LoRA rank 16 / alpha 32 on every linear layer, fp32,
and the same intra-op threads. Each side runs in its own subprocess so neither warms the other.

Tokens/s excludes warm-up on both sides: llmtrain's from its "progress" events after the first log
interval (steps WARMUP..end), TRL's from a TrainerCallback timing the same steps. Final loss is the
training loss of the last step of each. The last line is the llmtrain/TRL tokens/s ratio.

    DS_ACCELERATOR=cpu python benchmarks/finetune.py [--steps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

WARMUP = 5  # steps excluded from tokens/s; also llmtrain's log interval, so its first event marks it
BATCH = 8
SEQ = 256
LR = 1e-3
LR_WARMUP = 5
RANK, ALPHA = 16, 32
LORA = {"rank": RANK, "alpha": ALPHA, "dropout": 0.0}


def build_model(root: Path) -> Path:
    """A moderate Llama (hidden 256, 4 layers) with random weights, saved the way a hub snapshot is."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmtrain import testing_hf

    out = root / "model"
    testing_hf.tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = LlamaConfig(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=688,
        vocab_size=len(tok),
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def write_records(root: Path) -> Path:
    from llmtrain.testing import license_documents

    path = root / "records.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in license_documents()))
    return path


def llmtrain_config(root: Path, model_dir: Path, records: Path, steps: int) -> Path:
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
            "data": {"sources": [{"uri": str(records), "format": "JSONL"}]},
            "training": {
                "method": "LoRA",
                "lora": LORA,
                "maxSteps": steps,
                "sequenceLength": SEQ,
                "microBatchSize": BATCH,
                "globalBatchSize": BATCH,
                "precision": "FP32",
                "optimizer": {"learningRate": LR, "weightDecay": 0.0, "beta1": 0.9, "beta2": 0.95},
                "lrSchedule": {"warmupSteps": LR_WARMUP, "minLearningRateRatio": 0.1},
                "gradientClipping": 1.0,
                # No evaluation or checkpoint inside the timed steps.
                "checkpointing": {"intervalSteps": 100000},
                "evaluation": {"intervalSteps": 100000, "maxBatches": 1},
                "logIntervalSteps": WARMUP,
            },
            "deepspeed": {"zeroStage": 0},
            "workers": {"numNodes": 1, "procsPerNode": 1, "gpusPerNode": 0},
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(
        DS_ACCELERATOR="cpu",
        LLMTRAIN_LOG_FORMAT="json",
        LLMOP_METRICS_PORT="0",
        OMP_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _events(text: str, name: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == name:
                out.append(record)
    return out


def run_llmtrain(root: Path, model_dir: Path, records: Path, steps: int, threads: int) -> dict[str, float]:
    config = llmtrain_config(root / "llmtrain", model_dir, records, steps)
    logs = ""
    for stage in ("prepare", "train"):
        proc = subprocess.run(
            [sys.executable, "-m", "llmtrain.cli", stage, str(config)],
            capture_output=True,
            text=True,
            env=_env(threads),
            timeout=1800,
        )
        logs = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise SystemExit(f"llmtrain {stage} exited {proc.returncode}:\n{logs[-4000:]}")
    progress = [e for e in _events(logs, "progress") if e["step"] > WARMUP]
    if not progress or not _events(logs, "done"):
        raise SystemExit(f"llmtrain train logged no progress/done events:\n{logs[-4000:]}")
    # Each event's rate covers the steps since the previous one: total time = sum(tokens / rate).
    previous, seconds = WARMUP, 0.0
    for e in progress:
        seconds += (e["step"] - previous) * BATCH * SEQ / e["tokens_per_second"]
        previous = e["step"]
    return {
        "tokens_per_second": (previous - WARMUP) * BATCH * SEQ / seconds,
        "loss": progress[-1]["loss"],
        "steps": previous - WARMUP,
    }


def trl_main(model_dir: str, records: str, steps: int, threads: int, out: str) -> None:
    """The TRL side, in its own process (`--trl-child`)."""
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset  # type: ignore[import-untyped]
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: dict[int, float] = {}
            self.losses: dict[int, float] = {}

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.marks[state.global_step] = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    texts = [json.loads(line)["text"] for line in Path(records).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    timer = Timer()
    args = SFTConfig(
        output_dir=str(Path(out).parent / "trl-out"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=LR_WARMUP,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        # SFTConfig turns activation checkpointing on by default; llmtrain's default is off.
        gradient_checkpointing=False,
        max_length=SEQ,
        # "wrapped" concatenates and cuts into full max_length windows, as llmtrain's packed Text data.
        packing=True,
        packing_strategy="wrapped",
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
        bf16=False,
        fp16=False,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"text": t} for t in texts]),
        processing_class=tok,
        peft_config=LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
        callbacks=[timer],
    )
    trainer.train()
    seconds = timer.marks[steps] - timer.marks[WARMUP]
    Path(out).write_text(
        json.dumps(
            {
                "tokens_per_second": (steps - WARMUP) * BATCH * SEQ / seconds,
                "loss": timer.losses[max(timer.losses)],
                "steps": steps - WARMUP,
            }
        )
    )


def run_trl(root: Path, model_dir: Path, records: Path, steps: int, threads: int) -> dict[str, float]:
    root.mkdir(parents=True, exist_ok=True)
    out = root / "trl.json"
    cmd = [sys.executable, __file__, "--trl-child", str(model_dir), str(records), str(out)]
    cmd += ["--steps", str(steps), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads), timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"TRL run exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    result: dict[str, float] = json.loads(out.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per side, alternating; each keeps its fastest"
    )
    parser.add_argument("--trl-child", nargs=3, metavar=("MODEL", "RECORDS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= WARMUP:
        parser.error(f"--steps must exceed the {WARMUP} warm-up steps")
    if args.trl_child:
        model, records, out = args.trl_child
        trl_main(model, records, args.steps, args.threads, out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_model(root)
        records = write_records(root)
        # Alternating runs, each side keeping its fastest, so a noisy neighbour on a shared machine
        # penalises neither side more.
        runs: dict[str, list[dict[str, float]]] = {"llmtrain": [], "trl": []}
        for attempt in range(args.repeats):
            work = root / f"run-{attempt}"
            runs["llmtrain"].append(run_llmtrain(work, model_dir, records, args.steps, args.threads))
            runs["trl"].append(run_trl(work, model_dir, records, args.steps, args.threads))
        ours, theirs = (max(runs[k], key=lambda r: r["tokens_per_second"]) for k in ("llmtrain", "trl"))
    print(
        f"threads={args.threads} batch={BATCH}x{SEQ} tokens steps={args.steps} "
        f"(tokens/s over steps {WARMUP + 1}-{args.steps}) LoRA r={RANK} fp32 repeats={args.repeats}"
    )
    for name, best in (("llmtrain", ours), ("trl", theirs)):
        every = [round(r["tokens_per_second"]) for r in runs[name]]
        print(
            f"{name + ':':9} {best['tokens_per_second']:,.0f} tokens/s (runs {every}), final loss {best['loss']:.4f}"
        )
    print(f"finetune tokens/s vs trl: {ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}")


if __name__ == "__main__":
    main()
