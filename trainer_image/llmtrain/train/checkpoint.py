"""Atomic, resumable checkpoints.

Layout under paths.checkpointDir::

    step-00000100/            one complete checkpoint (DeepSpeed model/optimiser states, ZeRO partitions)
        mp_rank_00_model_states.pt ... zero_pp_rank_*_optim_states.pt
        rng-rank00000.pt       python/numpy/torch RNG state of each rank
    latest                    text file naming the newest complete checkpoint ("step-00000100")
    .tmp-step-00000200/       a checkpoint being written (deleted at start-up if a crash left one)

Every rank writes its shards into the ``.tmp-`` directory; after a barrier rank 0 renames it into place
and only then rewrites ``latest`` (write-to-temp + os.replace). A crash at any moment therefore leaves
``latest`` pointing at a complete checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtrain.train.dist import DistEnv, barrier

LATEST = "latest"
TMP_PREFIX = ".tmp-"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def latest_tag(root: Path) -> str | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (root / tag).is_dir() else None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, root: str | Path, keep_last: int, env: DistEnv) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.env = env
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in self.root.glob(TMP_PREFIX + "*"):
                shutil.rmtree(leftover, ignore_errors=True)
        barrier(env)

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> float:
        """Write checkpoint ``step`` (a collective: every rank must call it); returns seconds taken."""
        start = time.perf_counter()
        tag = tag_for(step)
        tmp = TMP_PREFIX + tag
        engine.save_checkpoint(str(self.root), tag=tmp, client_state=client_state, save_latest=False)
        torch.save(_rng_state(), self.root / tmp / f"rng-rank{self.env.rank:05d}.pt")
        barrier(self.env)  # every rank's shards are on disk before the checkpoint becomes visible
        if self.env.is_main:
            final = self.root / tag
            if final.exists():  # the same step saved again (e.g. SIGTERM right after an interval save)
                shutil.rmtree(final)
            os.rename(self.root / tmp, final)
            pointer_tmp = self.root / (TMP_PREFIX + LATEST)
            pointer_tmp.write_text(tag + "\n")
            os.replace(pointer_tmp, self.root / LATEST)
            _fsync_dir(self.root)
            self._prune()
        barrier(self.env)
        return time.perf_counter() - start

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def restore(self, engine: Any) -> dict[str, Any] | None:
        """Load the newest complete checkpoint into ``engine``; returns its client state, or None."""
        tag = latest_tag(self.root)
        if tag is None:
            return None
        path, client = engine.load_checkpoint(str(self.root), tag=tag, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        rng = self.root / tag / f"rng-rank{self.env.rank:05d}.pt"
        if rng.is_file():  # absent when resuming on more ranks than saved: those ranks keep their seed
            _set_rng_state(torch.load(rng, weights_only=False))
        client = dict(client or {})
        client["tag"] = tag
        return client
