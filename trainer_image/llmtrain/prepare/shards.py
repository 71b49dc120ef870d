"""The on-disk contract between data preparation and training (format ``llmop-shards-v1``).

``<data_dir>/manifest.json`` lists the shards of each split; a shard ``<split>-NNNNN.bin`` is raw
little-endian token ids (uint16 when vocab_size <= 65535, else uint32), documents concatenated each
followed by ``eos_id``; every shard holds exactly ``tokens_per_shard`` tokens except the last of its
split. See docs/prepare.md.

Supervised records add a companion ``<split>-NNNNN.flags.bin`` to every shard: one uint8 per token,
bit 0 (LOSS_FLAG) when the token is a target with a loss, bit 1 (RECORD_START_FLAG) on a record's
first token. It is cut at the same offsets as the tokens and checksummed in the manifest likewise.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmop_contract.protocol import MANIFEST_FILE, RECORD_START_FLAG, SHARD_FORMAT, DataManifest, Shard

SPLITS = ("train", "val")


def dtype_for(vocab_size: int) -> np.dtype[Any]:
    """uint16 holds ids up to 65534 when vocab_size <= 65535; larger vocabularies need uint32."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


class ShardWriter:
    """Cuts a stream of token ids into fixed-size shards, checksumming each as it is written.

    With ``flags=True`` every ``add`` brings the tokens' flags too, written alongside as uint8.
    """

    def __init__(
        self, out_dir: Path, split: str, dtype: np.dtype[Any], tokens_per_shard: int, flags: bool = False
    ) -> None:
        self.out_dir, self.split, self.dtype, self.size = out_dir, split, dtype, tokens_per_shard
        self.with_flags = flags
        self.shards: list[Shard] = []
        self._pending: list[npt.NDArray[Any]] = []
        self._pending_flags: list[npt.NDArray[np.uint8]] = []
        self._pending_tokens = 0

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards) + self._pending_tokens

    def add(self, ids: npt.NDArray[Any], flags: npt.NDArray[np.uint8] | None = None) -> None:
        if self.with_flags != (flags is not None):
            raise ValueError("flags must be given exactly when the writer was made with flags=True")
        self._pending.append(ids.astype(self.dtype, copy=False))
        if flags is not None:
            if flags.shape != ids.shape:
                raise ValueError(f"{flags.shape[0]} flags for {ids.shape[0]} tokens")
            self._pending_flags.append(flags.astype(np.uint8, copy=False))
        self._pending_tokens += ids.size
        if self._pending_tokens >= self.size:
            buf = np.concatenate(self._pending)
            fbuf = np.concatenate(self._pending_flags) if self.with_flags else None
            full = buf.size // self.size
            for k in range(full):
                part = slice(k * self.size, (k + 1) * self.size)
                self._write(buf[part], None if fbuf is None else fbuf[part])
            rest = buf[full * self.size :]
            self._pending = [rest] if rest.size else []
            if fbuf is not None:
                frest = fbuf[full * self.size :]
                self._pending_flags = [frest] if frest.size else []
            self._pending_tokens = rest.size

    def _write(self, ids: npt.NDArray[Any], flags: npt.NDArray[np.uint8] | None) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        data = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
        _write_file(self.out_dir / name, data)
        shard = Shard(file=name, tokens=int(ids.size), sha256=hashlib.sha256(data).hexdigest())
        if flags is not None:
            fdata = np.ascontiguousarray(flags, dtype=np.uint8).tobytes()
            shard.flags_sha256 = hashlib.sha256(fdata).hexdigest()
            shard.records = int(np.count_nonzero(flags & RECORD_START_FLAG))
            assert shard.flags_file is not None
            _write_file(self.out_dir / shard.flags_file, fdata)
        self.shards.append(shard)

    def close(self) -> list[Shard]:
        if self._pending_tokens:
            fbuf = np.concatenate(self._pending_flags) if self.with_flags else None
            self._write(np.concatenate(self._pending), fbuf)
            self._pending, self._pending_flags, self._pending_tokens = [], [], 0
        return self.shards


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


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
            if manifest.supervised and not _flags_present(data_dir, s):
                return False
    return True


def _flags_present(data_dir: Path, shard: Shard) -> bool:
    if shard.flags_file is None:  # a supervised manifest whose shard lacks flags is damaged
        return False
    path = data_dir / shard.flags_file
    return path.is_file() and path.stat().st_size == shard.tokens


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
            if manifest.supervised:
                problems += _verify_flags(data_dir, s)
    return problems


def _verify_flags(data_dir: Path, s: Shard) -> list[str]:
    if s.flags_file is None:
        return [f"{s.file}: supervised data without a flags checksum"]
    path = data_dir / s.flags_file
    if not path.is_file():
        return [f"{s.flags_file}: missing"]
    data = path.read_bytes()
    if len(data) != s.tokens:
        return [f"{s.flags_file}: {len(data)} flags for {s.tokens} tokens"]
    digest = hashlib.sha256(data).hexdigest()
    return [] if digest == s.flags_sha256 else [f"{s.flags_file}: sha256 {digest} != {s.flags_sha256}"]


def load_split(data_dir: Path, split: str) -> list[npt.NDArray[Any]]:
    """Memory-mapped token arrays of a split, in order (what a training data loader starts from)."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        raise FileNotFoundError(f"no {SHARD_FORMAT} manifest in {data_dir}")
    dtype = np.dtype(manifest.dtype).newbyteorder("<")
    return [np.memmap(data_dir / f, dtype=dtype, mode="r") for f in manifest.files(split)]
