"""Where a stage writes, the marker file that says how to load it, and the atomic commit.

    <outputDir>/compressed/<STAGE>/
        model.safetensors        weights (plain LlamaForCausalLM tensors, or quantised buffers)
        config.json              LlamaConfig (pruned/distilled shapes are the new, smaller ones)
        generation_config.json, tokenizer.json, tokenizer_config.json, ...   copied from the input
        compression.json         marker: format, stage, method, layout, per-module formats, fingerprint
        report.json              the comparison with the uncompressed model

A stage is built in ``compressed/.tmp-<STAGE>-<pid>/`` and renamed into place only once every file,
report.json last, is written; a crash leaves the previous result (or nothing) and a stray temporary
directory that the next run deletes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmop_contract.protocol import ModelLayout

MARKER = "compression.json"
REPORT = "report.json"
WEIGHTS = "model.safetensors"
FORMAT = "llmop-compressed-v1"

# The operator decides the serving engine by these names too (llmop.planner.engine): one definition.
LAYOUT_HF = ModelLayout.HF.value
"""Plain LlamaForCausalLM export: transformers' from_pretrained loads it as it is."""
LAYOUT_QUANTIZED = ModelLayout.QUANTIZED.value
"""Quantised buffers per module (formats listed in the marker): llmtrain.compress.load loads it."""


def stage_dir(output_dir: str | Path, stage: str) -> Path:
    return Path(output_dir) / "compressed" / stage


def model_dir(output_dir: str | Path) -> Path:
    """The trained model a stage reads (and never writes)."""
    return Path(output_dir) / "model"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_marker(root: str | Path) -> dict[str, Any] | None:
    """The marker of a compressed model directory; None for a plain export (or a foreign directory)."""
    marker = read_json(Path(root) / MARKER)
    return marker if marker is not None and marker.get("format") == FORMAT else None


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


def copy_side_files(source: Path, dest: Path) -> None:
    """Tokenizer and generation files of the input model; config.json and weights are the stage's own."""
    for item in sorted(source.iterdir()):
        if item.is_file() and item.name not in (WEIGHTS, "config.json", MARKER, REPORT):
            shutil.copy2(item, dest / item.name)


def weights_bytes(root: str | Path) -> int:
    """Size on disk of the weights (every *.safetensors file); tokenizer and JSON files are not counted."""
    return sum(p.stat().st_size for p in Path(root).glob("*.safetensors"))


def remove_stale(final: Path) -> None:
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in final.parent.glob(f".old-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def staging(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on normal exit it replaces ``final`` by rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(tmp)
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for item in path.iterdir():
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
