"""Shared trainer fixtures: one model really trained by ``llmtrain train`` for the whole session.

Compression and serving tests start from it, so they test what a job would hand them: an export
written by the trainer (model.safetensors, config.json, tokenizer files) after real training.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmtrain.testing import debug_config, license_documents, write_shards

# Large enough that structured pruning has heads and channels to remove (1.7M parameters, 4 layers,
# grouped-query attention) and that int4 groups of 64 divide every in-feature, small enough to train
# in about a minute on two cores. 200 steps at 1e-3 take the validation loss from 6.25 to 3.58
# (perplexity 36); the debug config's 3e-3 is too high for this width and stalls near 4.8, and a
# teacher that weak is beaten by its own students.
TRAINED_SPEC = {
    "model": {
        "hiddenSize": 192,
        "numLayers": 4,
        "numHeads": 6,
        "numKeyValueHeads": 3,
        "intermediateSize": 512,
        "contextLength": 128,
    },
    "training": {
        "maxSteps": 200,
        "optimizer": {"learningRate": 0.001},
        "logIntervalSteps": 50,
        "evaluation": {"intervalSteps": 100, "maxBatches": 8},
        "checkpointing": {"intervalSteps": 1000},
    },
}


@dataclass(frozen=True)
class TrainedModel:
    """A finished training run. Treat every path as read-only: the fixture is shared by the session."""

    config: Path
    """The TrainerConfig it was trained with (paths point at the directories below)."""
    data_dir: Path
    """llmop-shards-v1 shards, manifest and tokenizer of the licence-text corpus."""
    output_dir: Path
    """paths.outputDir; the export is in ``output_dir / "model"``."""

    @property
    def model_dir(self) -> Path:
        return self.output_dir / "model"


def train_env() -> dict[str, str]:
    """Environment for a one-process ``llmtrain`` run: CPU DeepSpeed, JSON logs, any free metrics port."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "NNODES", "NPROC_PER_NODE")}
    env.update(DS_ACCELERATOR="cpu", LLMTRAIN_LOG_FORMAT="json", LLMOP_METRICS_PORT="0")
    return env


POISONED_TORCH = "poisoned torch: this command imported torch"


def torchless_env(root: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) with a ``torch`` package first on PYTHONPATH whose import raises.

    A command that succeeds, or fails the way it should, under this environment never imported torch
    (nor DeepSpeed or transformers, which import it). RuntimeError, not ImportError, so that no
    ``try: import torch / except ImportError`` can swallow it.
    """
    package = root / "poisoned-torch" / "torch"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(f"raise RuntimeError({POISONED_TORCH!r})\n")
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(package.parent), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="session")
def english_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled English corpus through the real data stage (clean, dedup, BPE, shards), once for
    the session: the distributed, world-resize and elastic tests only read it."""
    from llmtrain import prepare
    from llmtrain.config import load_config

    work = tmp_path_factory.mktemp("prepared")
    data = work / "data"
    cfg = load_config(str(debug_config(work, data, {"data": {"sources": [{"uri": "builtin://english"}]}})))
    prepare.run(cfg)
    return data


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    root = tmp_path_factory.mktemp("trained")
    data_dir = write_shards(root / "data", license_documents(), vocab_size=512)
    config = debug_config(root / "run", data_dir, TRAINED_SPEC)
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", "train", str(config)],
        capture_output=True,
        text=True,
        env=train_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    trained = TrainedModel(config=config, data_dir=data_dir, output_dir=root / "run" / "output")
    assert (trained.model_dir / "model.safetensors").is_file()
    return trained
