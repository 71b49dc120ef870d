"""Checksum manifests of checkpoints: "complete" means the manifest exists and every file matches it.

DeepSpeed's own ``latest`` file (and ours, see checkpoint.py) only names the newest tag; it says
nothing about whether that tag's files are whole. A disk that filled up, a node lost mid-write on
storage that reorders writes, or a file truncated later by hand all leave a directory that looks
complete and makes every retry crash inside ``torch.load``. So when a checkpoint is committed the
committing rank hashes every file and writes ``MANIFEST`` last (temp file + fsync + os.replace), and a
resume uses only a checkpoint whose manifest verifies.

Torch-free, so the verification can be tested (and run by hand) without a training stack.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "llmtrain-checkpoint.json"
FORMAT = "llmtrain-checkpoint-v1"
CHUNK = 1 << 20
"""Hash in 1 MiB reads: checkpoint files are up to many GiB and must not be read into memory."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    """Every regular file under ``directory`` (DeepSpeed nests none today, but may), manifest excluded."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, step: int) -> dict[str, Any]:
    """Hash every file of the checkpoint in ``directory`` and write its manifest, last and atomically."""
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _files(directory)
    }
    manifest = {"format": FORMAT, "step": step, "files": files}
    staged = directory / f".{MANIFEST}.tmp"
    with open(staged, "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(staged, directory / MANIFEST)
    return manifest


@dataclass(frozen=True)
class Rejection:
    """Why a checkpoint directory is not usable: which file (if one) and what is wrong with it."""

    checkpoint: Path
    reason: str
    """missing manifest, unreadable manifest, missing file, size mismatch or checksum mismatch."""
    file: str | None = None
    detail: str = ""

    def __str__(self) -> str:
        where = f" file {self.file}" if self.file else ""
        return f"{self.checkpoint}{where}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


def verify(directory: Path) -> Rejection | None:
    """None when ``directory`` holds a complete checkpoint, else the first thing wrong with it.

    Sizes are checked for every file before any is hashed, so a truncated file is found by a stat.
    Files that the manifest does not list are ignored (they are not part of what was committed).
    """
    path = directory / MANIFEST
    if not path.is_file():
        return Rejection(directory, "missing manifest", MANIFEST)
    try:
        manifest = json.loads(path.read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
        if manifest.get("format") != FORMAT or not entries:
            raise ValueError(f"format {manifest.get('format')!r} with {len(entries)} files")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return Rejection(directory, "unreadable manifest", MANIFEST, repr(exc))
    for name, size, _ in entries:
        try:
            actual = (directory / name).stat().st_size
        except OSError:
            return Rejection(directory, "missing file", name)
        if actual != size:
            return Rejection(directory, "size mismatch", name, f"{actual} bytes, manifest says {size}")
    for name, _, digest in entries:
        try:
            actual_digest = sha256_file(directory / name)
        except OSError as exc:
            return Rejection(directory, "unreadable file", name, repr(exc))
        if actual_digest != digest:
            return Rejection(
                directory,
                "checksum mismatch",
                name,
                f"sha256 {actual_digest[:12]}..., manifest says {digest[:12]}...",
            )
    return None
