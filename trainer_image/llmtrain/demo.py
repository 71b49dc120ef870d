"""`make demo`: the embedded default run, end to end on this machine.

Prepares the bundled corpus, trains with DeepSpeed ZeRO-2 on two local ranks (gloo, the same
SSH-less launcher a worker pod uses), loads the exported model with transformers and samples from
it, then prints a summary. Re-running is quick: preparation is a no-op on unchanged input and
training resumes from its latest checkpoint (already at the last step).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "local-quickstart.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(stage: str, args: list[str], env: dict[str, str]) -> tuple[float, list[dict[str, Any]]]:
    """Run one `llmtrain` stage, echoing its progress; returns seconds taken and its JSON events."""
    print(f"==> {stage}", flush=True)
    started = time.monotonic()
    events: list[dict[str, Any]] = []
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"    {line.rstrip()}", flush=True)
            continue
        events.append(record)
        fields = " ".join(f"{k}={v}" for k, v in record.items() if k not in ("ts", "rank", "event"))
        print(f"    {record.get('event')}: {fields}", flush=True)
    if proc.wait() != 0:
        sys.exit(f"{stage} failed with exit code {proc.returncode}")
    return time.monotonic() - started, events


def main() -> int:
    os.chdir(REPO)
    from llmtrain.config import load_config

    cfg = load_config(str(CONFIG))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "LLMTRAIN_LOG_FORMAT": "json", "OMP_NUM_THREADS": "1"}
    llmtrain = [sys.executable, "-m", "llmtrain.cli"]
    prep_s, _ = _run("prepare", [*llmtrain, "prepare", str(CONFIG)], env)
    launcher = {
        "NNODES": "1",
        "NODE_RANK": "0",
        "NPROC_PER_NODE": str(cfg.spec.workers.procs_per_node),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "LLMOP_METRICS_PORT": "0",
    }
    train_s, events = _run(
        "train (DeepSpeed ZeRO-2, 2 ranks over gloo)", [*llmtrain, "train", str(CONFIG)], {**env, **launcher}
    )

    manifest = json.loads((Path(cfg.paths.data_dir) / "manifest.json").read_text())
    progress = [e for e in events if e.get("event") == "progress"]
    evals = [e for e in events if "validation_loss" in e]
    model_dir = Path(cfg.paths.output_dir) / "model"

    print("==> sample from the exported model (transformers, offline)", flush=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)  # transformers types generate() loosely
    prompt = "The software is provided"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    sample = tok.decode(out[0], skip_special_tokens=True)

    stats = manifest.get("stats", {})
    kept = stats.get("documents_out", {})
    kept_total = sum(kept.values()) if isinstance(kept, dict) else kept
    print("\n==> summary")
    print(
        f"  prepare     {prep_s:7.1f} s   documents {stats.get('documents_in')} in, {kept_total} kept ({kept})"
    )
    print(f"  train       {train_s:7.1f} s   steps {progress[-1]['step'] if progress else '?'}")
    if progress:
        print(f"  final training loss    {progress[-1]['loss']:.3f}")
        print(f"  tokens/s (2 ranks)     {progress[-1].get('tokens_per_second')}")
    if evals:
        print(
            f"  validation loss        {evals[0]['validation_loss']:.3f} (first) -> {evals[-1]['validation_loss']:.3f} (last)"
        )
    print(f"  exported model         {model_dir}")
    print(f"  sample                 {sample!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
