"""Host memory per rank of loading a pretrained checkpoint at ZeRO-0 and ZeRO-3, phase by phase.

A Llama of about 43M parameters (hidden 768, 6 layers, random weights saved as model.safetensors) is
loaded by the trainer's own code (llmtrain.model.hf.load, then llmtrain.train.engine.initialize) on 2
CPU ranks under torchrun (gloo), FP32, full fine-tuning with AdamW, and trained for one step. Each
rank prints, for every phase, the peak resident memory reached during that phase (the kernel's
high-water mark, reset at each phase start through /proc/self/clear_refs) over the baseline: resident
memory once torch, DeepSpeed and transformers are imported, before the model exists. A full copy is
what one rank holds without ZeRO: weights, gradients and Adam's two moments, 16 bytes a parameter.
The last line is the ZeRO-3 loading peak (worst rank, to the end of deepspeed.initialize) as a
fraction of the full copy.

    DS_ACCELERATOR=cpu python benchmarks/zero3_memory.py [--hidden 768 --layers 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("from_pretrained", "initialize", "step")
BYTES_PER_PARAM = 4 + 4 + 8  # fp32 weight, fp32 gradient, Adam's two fp32 moments


def build(root: Path, hidden: int, layers: int) -> tuple[Path, int]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmtrain import testing_hf

    out = root / "model"
    testing_hf.tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        intermediate_size=hidden * 8 // 3,
        vocab_size=len(tok),
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def config(root: Path, model_dir: Path, zero: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.trainer.finetune_helpers import finetune_config

    training = {
        "maxSteps": 2,
        "microBatchSize": 2,
        "globalBatchSize": 4,
        "method": "Full",
        "precision": "FP32",
        "lrSchedule": {"warmupSteps": 1},
    }
    # hf.load and initialize read neither data nor output paths: the data dir need not exist.
    return finetune_config(root / f"zero{zero}", root / "data", model_dir, training, zero)


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def worker(config_path: Path) -> None:
    """One rank: load, initialize, one step; print a JSON line of per-phase figures."""
    import deepspeed
    import torch

    from llmtrain.config import load_config
    from llmtrain.logs import Logger
    from llmtrain.model import hf
    from llmtrain.train import engine as eng

    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    cfg = load_config(config_path)
    assert cfg.spec.model.pretrained is not None
    ds_config = eng.deepspeed_config(cfg)
    _reset_peak()
    p = hf.load(cfg, ds_config, Path(cfg.spec.model.pretrained.uri), int(os.environ["LOCAL_RANK"]))
    assert p.module.memory_before_load is not None
    baseline = p.module.memory_before_load.rss
    phases: dict[str, Any] = {"from_pretrained": _status()}
    _reset_peak()
    engine = eng.initialize(p.module, cfg, Logger(1), ds_config)  # Logger(1): silent
    phases["initialize"] = _status()
    _reset_peak()
    x = torch.randint(0, p.architecture.vocab, (2, 64))
    loss, _ = engine(x, x)
    engine.backward(loss)
    engine.step()
    phases["step"] = _status()
    held = sum(
        (getattr(q, "ds_tensor", None) if getattr(q, "ds_tensor", None) is not None else q.data).nbytes
        for q in p.module.parameters()
    )
    # A file per rank: the ranks' stdout lines interleave under torchrun.
    result = {"rank": rank, "baseline": baseline, "param_bytes": held, "phases": phases}
    (config_path.parent / f"result-{rank}.json").write_text(json.dumps(result))


def run(config_path: Path, port: int) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        __file__,
        "--worker",
        str(config_path),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    files = sorted(config_path.parent.glob("result-*.json"))
    results = [json.loads(f.read_text()) for f in files]
    if done.returncode != 0 or len(results) != 2:
        sys.exit(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return sorted(results, key=lambda r: r["rank"])


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", type=Path)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    from llmtrain.train.dist import free_port

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, params = build(root, args.hidden, args.layers)
        full = params * BYTES_PER_PARAM
        print(f"llama {params / 1e6:.1f}M parameters, FP32, AdamW, 2 ranks (gloo)")
        print(f"one full copy (weights + grads + Adam): {mb(full)}")
        worst: dict[int, float] = {}
        for zero in (0, 3):
            results = run(config(root, model_dir, zero), free_port())
            for r in results:
                peaks = {ph: r["phases"][ph]["VmHWM"] - r["baseline"] for ph in PHASES}
                after = r["phases"]["step"]
                print(
                    f"ZeRO-{zero} rank {r['rank']}: baseline {mb(r['baseline'])}, params held "
                    f"{mb(r['param_bytes'])}; peak over baseline: "
                    + ", ".join(f"{ph} {mb(v)}" for ph, v in peaks.items())
                    + f"; after step anon {mb(after['RssAnon'])} file {mb(after['RssFile'])}"
                )
                loading = max(peaks["from_pretrained"], peaks["initialize"])
                worst[zero] = max(worst.get(zero, 0.0), loading)
        for zero, peak in worst.items():
            print(f"ZeRO-{zero} loading peak (worst rank): {mb(peak)} = {peak / full:.2f} of a full copy")
        print(f"zero3 loading peak vs full copy: {worst[3] / full:.2f}")


if __name__ == "__main__":
    main()
