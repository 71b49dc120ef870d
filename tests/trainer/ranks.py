"""Running ``llmtrain train`` on two local ranks under torchrun, and reading its JSON log events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from llmtrain.train.dist import free_port

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
TRAIN = ["-m", "llmtrain.cli", "train"]


def env(**extra: str) -> dict[str, str]:
    """CPU DeepSpeed, JSON logs, any metrics port, one thread per rank (two ranks share two cores)."""
    out = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NNODES")}
    out.update(DS_ACCELERATOR="cpu", LLMTRAIN_LOG_FORMAT="json", LLMOP_METRICS_PORT="0", OMP_NUM_THREADS="1")
    out.update(extra)
    return out


def torchrun(config: Path, log: Path, timeout: float = 240, nproc_per_node: int = 2, **extra: str) -> int:
    """``llmtrain train`` on ``nproc_per_node`` local ranks (2 unless a test's mesh needs more)."""
    launcher = [
        f"--nproc_per_node={nproc_per_node}" if a.startswith("--nproc_per_node=") else a for a in TORCHRUN
    ]
    cmd = [*launcher, f"--master_port={free_port()}", *TRAIN, str(config)]
    with log.open("a") as out:
        return subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env(**extra), timeout=timeout
        ).returncode


def events(log: Path, name: str) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == name:
                out.append(record)
    return out
