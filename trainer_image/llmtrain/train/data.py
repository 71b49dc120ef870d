"""Token shards -> fixed-length training windows, in a deterministic, resumable, rank-strided order.

Each split is the concatenation of its memory-mapped shards. Window ``i`` is tokens
``[i*T, i*T + T + 1)`` (inputs plus the shifted targets). Every epoch visits the windows in the
permutation drawn from ``seed + epoch``; global sample ``g`` of that order goes to rank ``g % world``,
like DistributedSampler. The position is (epoch, micro-batches consumed), which is all a resume needs
to continue with exactly the same samples, whatever was prefetched when the checkpoint was taken.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmop_contract.protocol import DataManifest
from llmtrain import datacheck
from llmtrain.config import DataError

_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def read_manifest(data_dir: str | Path) -> DataManifest:
    """``<data_dir>/manifest.json``; DataError (exit 2) when prepare has not run or it is invalid."""
    return datacheck.read_manifest(data_dir)


def split_files(data_dir: str | Path, manifest: DataManifest, split: str) -> list[Path]:
    """The shard files of ``split``, in order."""
    return [Path(data_dir) / f for f in manifest.files(split)]


class TokenStream:
    """One split's shards as a single read-only token array (no copy: np.memmap per shard)."""

    def __init__(self, files: list[Path], dtype: str) -> None:
        self.maps = [np.memmap(f, dtype=_DTYPES[dtype], mode="r") for f in files]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        done = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while done < n:
            local = start + done - int(self.starts[shard])
            take = min(n - done, len(self.maps[shard]) - local)
            out[done : done + take] = self.maps[shard][local : local + take]
            done += take
            shard += 1
        return out


IGNORE = -100
"""Target id that carries no loss (torch's cross_entropy ignore_index, Hugging Face's label convention)."""


class Batch(tuple[Tensor, Tensor]):
    """One micro-batch: ``inputs`` [B, T], ``targets`` [B, T] (IGNORE = no loss), ``positions`` [B, T].

    ``positions`` is None for plain text (the model counts 0..T-1 itself); with packed records it
    restarts at 0 at every record start, which transformers turns into per-record attention. A tuple
    of (inputs, targets) underneath, so ``x, y = batch`` keeps working where positions do not matter.
    """

    positions: Tensor | None

    def __new__(cls, inputs: Tensor, targets: Tensor, positions: Tensor | None = None) -> Batch:
        batch = super().__new__(cls, (inputs, targets))
        batch.positions = positions
        return batch

    @property
    def inputs(self) -> Tensor:
        return self[0]

    @property
    def targets(self) -> Tensor:
        return self[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        pos = None if self.positions is None else move(self.positions)
        return Batch(move(self.inputs), move(self.targets), pos)


@dataclass
class Position:
    """Where the next training micro-batch starts: epoch and micro-batches (all ranks) consumed in it."""

    epoch: int = 0
    batch: int = 0


class Windows:
    """Fixed-length windows of one split and their per-epoch order."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int) -> None:
        self.stream, self.seq_len, self.seed = stream, seq_len, seed
        self.count = (len(stream) - 1) // seq_len
        if self.count < 1:
            raise DataError(f"split has {len(stream)} tokens, fewer than one window of {seq_len + 1}")
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng(self.seed + epoch).permutation(self.count))
        return self._order[1]

    def sample(self, window: int) -> np.ndarray:
        return self.stream.read(window * self.seq_len, self.seq_len + 1)

    def batch(self, windows: list[int]) -> Batch:
        rows = torch.from_numpy(np.stack([self.sample(w) for w in windows]))
        return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())


class TrainLoader:
    """Micro-batches for one rank, produced ahead of time by a background thread.

    ``position`` always describes the batches *handed out*, not the ones prefetched, so checkpointing
    it and restarting from it replays nothing and skips nothing.
    """

    def __init__(
        self,
        windows: Windows,
        micro_batch: int,
        rank: int,
        world: int,
        position: Position,
        prefetch: int = 4,
    ) -> None:
        self.windows, self.micro, self.rank, self.world = windows, micro_batch, rank, world
        self.per_epoch = windows.count // (micro_batch * world)
        if self.per_epoch < 1:
            raise DataError(
                f"train split has {windows.count} windows, fewer than one global micro-batch "
                f"({micro_batch} x {world} processes)"
            )
        self.position = Position(position.epoch, position.batch)
        self._queue: queue.Queue[tuple[Batch, Position] | BaseException] = queue.Queue(prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="llmtrain-prefetch", daemon=True)
        self._thread.start()

    def _indices(self, pos: Position) -> list[int]:
        order = self.windows.order(pos.epoch)
        first = pos.batch * self.micro * self.world
        return [int(order[first + k * self.world + self.rank]) for k in range(self.micro)]

    def _produce(self) -> None:
        pos = Position(self.position.epoch, self.position.batch)
        try:
            while not self._stop.is_set():
                batch = self.windows.batch(self._indices(pos))
                pos = Position(pos.epoch, pos.batch + 1)
                if pos.batch == self.per_epoch:  # drop the ragged tail: every rank sees full batches
                    pos = Position(pos.epoch + 1, 0)
                while not self._stop.is_set():
                    try:
                        self._queue.put((batch, pos), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced in the training thread by next()
            self._queue.put(exc)

    def next(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise RuntimeError("data prefetch thread failed") from item
        batch, self.position = item
        return batch

    def state(self) -> dict[str, Any]:
        return asdict(self.position)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def validation_batches(
    windows: Windows, micro_batch: int, rank: int, world: int, max_batches: int
) -> list[Batch]:
    """The first ``max_batches`` global micro-batches of the val split in file order (fixed every eval).

    A val split smaller than that is used whole; one smaller than a single global batch wraps around,
    so every rank still evaluates the same number of batches and collectives stay matched.
    """
    per_batch = micro_batch * world
    n = max(1, min(max_batches, windows.count // per_batch))
    out: list[Batch] = []
    for b in range(n):
        ids = [(b * per_batch + k * world + rank) % windows.count for k in range(micro_batch)]
        out.append(windows.batch(ids))
    return out
