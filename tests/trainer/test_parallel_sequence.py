"""Ulysses sequence parallel (llmtrain.train.sequence_parallel) against the full sequence on one rank.

Harness, not yet the real trainer: the loop's sequence-parallel hooks are not in train/loop.py yet.
Each run is a torchrun job of this module's ``main``: the same seed gives the same initial weights
(built before any slicing) and the same token batches. The reference is 1 rank that sees every whole
sequence (data parallel of size 1 over the same global batch); sequence=2 runs 2 ranks that each see
half of every sequence, with DeepSpeed reducing gradients over the sequence-data-parallel group.

Tolerance 1e-4 relative per step (FP32): the two runs differ only in summation order (the slice
losses added across ranks, attention's all-to-all exchange is exact, the all-reduce sums two partial
gradients), ~1e-7 per step, carried forward by Adam over 50 steps. A wrong rotary offset, a missing
1/sp loss scale (a gradient twice too large) or unmatched slices are off by > 1e-2 within a few steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmtrain.train.dist import free_port
from tests.trainer.ranks import env

pytestmark = pytest.mark.slow

STEPS = 50
RESUMED = 20
TOLERANCE = 1e-4
SEQ = 32
BATCH = 4


def _config(lr: float = 3e-3) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": lr, "torch_adam": True}},
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }


def main(out: str, sp: int, steps: int, start: int, load: str, save: str) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from llmtrain.model.args import LlamaArgs
    from llmtrain.model.llama import Llama, init_weights
    from llmtrain.train import sequence_parallel as seqp

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    args = LlamaArgs(
        vocab_size=256,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_key_value_heads=2,
        intermediate_size=172,
        context_length=SEQ,
    )
    torch.manual_seed(0)
    model = Llama(args)
    init_weights(model, args, seed=0)
    groups = None
    if sp > 1:
        groups = seqp.SequenceGroups.build(sp)
        model = seqp.wrap(model, groups)
    engine, *_ = deepspeed.initialize(model=model, config=_config(), mpu=groups)
    if load:
        engine.load_checkpoint(load)
    data = torch.Generator().manual_seed(1)
    # A random 8-token motif repeated: after its first period every token is predictable by looking
    # back 8 positions, across the slice boundary too, so the loss falls only if attention sees the
    # whole sequence.
    motifs = [torch.randint(0, 32, (BATCH, 8), generator=data) for _ in range(start + steps)]
    batches = [m.repeat(1, SEQ // 8 + 1)[:, : SEQ + 1] for m in motifs]
    losses, peak, saved = [], 0, [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    for step in range(start, start + steps):
        tokens = batches[step]
        x, y = tokens[:, :-1], tokens[:, 1:]
        if groups is not None:
            x, y = seqp.local(x, groups), seqp.local(y, groups)
        saved[0] = 0
        # Bytes autograd keeps for backward (activations; parameters too, which every rank holds).
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = engine(x, y)
        peak = max(peak, saved[0])
        backprop = seqp.scale_loss(loss, groups) if groups is not None else loss
        engine.backward(backprop)
        engine.step()
        logged = seqp.full_loss(loss, groups) if groups is not None else loss.detach()
        losses.append(float(logged))
    if save:
        engine.save_checkpoint(save, tag="last")
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"losses": losses, "activation_bytes": peak}))


def run(
    tmp: Path, name: str, ranks: int, sp: int, steps: int, start: int = 0, load: str = "", save: str = ""
) -> dict[str, Any]:
    out = tmp / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "tests.trainer.test_parallel_sequence",
        str(out),
        str(sp),
        str(steps),
        str(start),
        load,
        save,
    ]
    log = tmp / f"{name}.log"
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), timeout=240).returncode
    assert rc == 0, log.read_text()[-4000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def test_sequence_parallel_matches_full_sequence_and_resumes_under_data_parallel(tmp_path: Path) -> None:
    ref = run(tmp_path, "ref", ranks=1, sp=1, steps=STEPS + RESUMED)
    half = STEPS
    ckpt = str(tmp_path / "ckpt")
    seq = run(tmp_path, "sp2", ranks=2, sp=2, steps=half, save=ckpt)
    # The same checkpoint resumed without sequence parallel on the same 2 ranks: ZeRO's partition
    # count (2, the sequence-data-parallel group) is unchanged, the full model is on every rank.
    # The two dp ranks read the same batch (BATCH each): the global batch per rank is what the
    # reference sees, the mean over two copies of it is the same gradient.
    rest = run(tmp_path, "dp_resume", ranks=2, sp=1, steps=RESUMED, start=half, load=ckpt)
    curve = seq["losses"] + rest["losses"]
    diff_sp = _max_rel(seq["losses"], ref["losses"][:half])
    diff_resume = _max_rel(rest["losses"], ref["losses"][half:])
    print(f"sp=2 vs full sequence: max relative loss diff {diff_sp:.2e} over {half} steps")
    print(f"resumed under dp=2: max relative loss diff {diff_resume:.2e} over {len(rest['losses'])} steps")
    ratio = seq["activation_bytes"] / ref["activation_bytes"]
    print(
        f"per-rank bytes saved for backward: sp=2 {seq['activation_bytes']} vs {ref['activation_bytes']}: {ratio:.2f}"
    )
    steps = [abs(x - y) / y for x, y in zip(curve, ref["losses"], strict=True)]
    print("relative diff per step:", " ".join(f"{d:.0e}" for d in steps))
    assert ref["losses"][-1] < ref["losses"][0] * 0.9  # it learns: a flat curve would prove nothing
    assert diff_sp < TOLERANCE and diff_resume < TOLERANCE, curve
    # Half the tokens per rank; parameters saved for backward (lm_head, embeddings) keep it above 0.5.
    assert ratio < 0.75


if __name__ == "__main__":
    a = sys.argv[1:]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(a[0], int(a[1]), int(a[2]), int(a[3]), a[4] if len(a) > 4 else "", a[5] if len(a) > 5 else "")
