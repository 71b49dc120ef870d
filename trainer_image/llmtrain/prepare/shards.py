"""The on-disk contract between data preparation and training (format ``llmop-shards-v1``).

``<data_dir>/manifest.json`` lists the shards of each split; a shard ``<split>-NNNNN.bin`` is raw
little-endian token ids (uint16 when vocab_size <= 65535, else uint32), documents concatenated each
followed by ``eos_id``; every shard holds exactly ``tokens_per_shard`` tokens except the last of its
split. See docs/prepare.md.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmop_contract.protocol import MANIFEST_FILE, SHARD_FORMAT, DataManifest, Shard

SPLITS = ("train", "val")


def dtype_for(vocab_size: int) -> np.dtype[Any]:
    """uint16 holds ids up to 65534 when vocab_size <= 65535; larger vocabularies need uint32."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


class ShardWriter:
    """Cuts a stream of token ids into fixed-size shards, checksumming each as it is written."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype[Any], tokens_per_shard: int) -> None:
        self.out_dir, self.split, self.dtype, self.size = out_dir, split, dtype, tokens_per_shard
        self.shards: list[Shard] = []
        self._pending: list[npt.NDArray[Any]] = []
        self._pending_tokens = 0

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards) + self._pending_tokens

    def add(self, ids: npt.NDArray[Any]) -> None:
        self._pending.append(ids.astype(self.dtype, copy=False))
        self._pending_tokens += ids.size
        if self._pending_tokens >= self.size:
            buf = np.concatenate(self._pending)
            full = buf.size // self.size
            for k in range(full):
                self._write(buf[k * self.size : (k + 1) * self.size])
            rest = buf[full * self.size :]
            self._pending = [rest] if rest.size else []
            self._pending_tokens = rest.size

    def _write(self, ids: npt.NDArray[Any]) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        data = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
        with open(self.out_dir / name, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self.shards.append(Shard(file=name, tokens=int(ids.size), sha256=hashlib.sha256(data).hexdigest()))

    def close(self) -> list[Shard]:
        if self._pending_tokens:
            self._write(np.concatenate(self._pending))
            self._pending, self._pending_tokens = [], 0
        return self.shards


def read_manifest(data_dir: Path) -> DataManifest | None:
    """The manifest, or None when there is none or it is not a valid manifest of this format."""
    try:
        return DataManifest.model_validate_json((data_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None


def shards_present(data_dir: Path, manifest: DataManifest) -> bool:
    """Every listed shard exists with the size its token count implies (cheap; no checksum)."""
    itemsize = np.dtype(manifest.dtype).itemsize
    for shards in manifest.splits.values():
        for s in shards:
            path = data_dir / s.file
            if not path.is_file() or path.stat().st_size != s.tokens * itemsize:
                return False
    return True


def verify(data_dir: Path) -> list[str]:
    """Problems found by re-hashing every shard against the manifest (empty when all is well)."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        return [f"no {SHARD_FORMAT} manifest in {data_dir}"]
    problems = []
    for shards in manifest.splits.values():
        for s in shards:
            path = data_dir / s.file
            if not path.is_file():
                problems.append(f"{s.file}: missing")
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != s.sha256:
                problems.append(f"{s.file}: sha256 {digest} != {s.sha256}")
    return problems


def load_split(data_dir: Path, split: str) -> list[npt.NDArray[Any]]:
    """Memory-mapped token arrays of a split, in order (what a training data loader starts from)."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise FileNotFoundError(f"no {SHARD_FORMAT} manifest in {data_dir}")
    dtype = np.dtype(manifest.dtype).newbyteorder("<")
    return [np.memmap(data_dir / f, dtype=dtype, mode="r") for f in manifest.files(split)]
