"""Token shards -> fixed-length training windows, in a deterministic, resumable, rank-strided order.

Each split is the concatenation of its memory-mapped shards. Window ``i`` is tokens
``[i*T, i*T + T + 1)`` (inputs plus the shifted targets). Every epoch visits the windows in the
permutation drawn from ``seed + epoch``; global sample ``g`` of that order goes to rank ``g % world``,
like DistributedSampler. The position is (epoch, micro-batches consumed), which is all a resume needs
to continue with exactly the same samples, whatever was prefetched when the checkpoint was taken.

Supervised data (a flags file per shard, see llmop_contract.protocol) comes in two packings:

- Packed: the same windows, but a target carries a loss only where its flag says so (completion and
  assistant tokens, each record's EOS), never at a record's first token (nothing is predicted across
  records), and positions restart at 0 at every record start, which transformers turns into
  attention that stays within each record.
- Padded (``Records``): sample ``i`` is record ``i`` alone, cut to ``sequenceLength + 1`` tokens and
  right-padded to the longest row of its batch; padding has no loss. Causal attention never looks
  ahead, so right padding needs no attention mask.

Both order, stride and resume exactly like the windows of plain text.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from llmop_contract.protocol import LOSS_FLAG, RECORD_START_FLAG, DataManifest
from llmtrain import datacheck
from llmtrain.config import DataError

_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "uint8": np.uint8}


def read_manifest(data_dir: str | Path) -> DataManifest:
    """``<data_dir>/manifest.json``; DataError (exit 2) when prepare has not run or it is invalid."""
    return datacheck.read_manifest(data_dir)


def split_files(data_dir: str | Path, manifest: DataManifest, split: str) -> list[Path]:
    """The shard files of ``split``, in order."""
    return [Path(data_dir) / f for f in manifest.files(split)]


def flag_files(data_dir: str | Path, manifest: DataManifest, split: str) -> list[Path] | None:
    """The flags files of ``split`` in shard order; None for plain text (no flags)."""
    if not manifest.supervised:
        return None
    names = [s.flags_file for s in manifest.splits.get(split, [])]
    if any(n is None for n in names):
        raise DataError(f"{split} split: supervised data, but the manifest lists shards without flags")
    return [Path(data_dir) / str(n) for n in names]


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

    def at_world(self, micro_batch: int, saved_world: int, world: int) -> Position:
        """The same place in the data order for ``world`` ranks, from a position saved by ``saved_world``.

        A global micro-batch is ``micro_batch x world`` consecutive windows of the epoch's order, so
        a position is really a count of windows consumed; it maps exactly when that count divides
        into the new global micro-batches, which holds at every optimiser-step boundary (where
        checkpoints are taken) as long as the global batch is kept.
        """
        windows = self.batch * micro_batch * saved_world
        per_batch = micro_batch * world
        if windows % per_batch:
            raise DataError(
                f"the checkpoint's data position ({windows} windows into epoch {self.epoch}, written by "
                f"{saved_world} ranks) is not a whole number of global micro-batches of {per_batch} "
                f"({micro_batch} x {world} ranks): keep globalBatchSize a multiple of microBatchSize x ranks"
            )
        return Position(self.epoch, windows // per_batch)


class Windows:
    """Fixed-length windows of one split and their per-epoch order."""

    def __init__(
        self, stream: TokenStream, seq_len: int, seed: int, flags: TokenStream | None = None
    ) -> None:
        self.stream, self.seq_len, self.seed, self.flags = stream, seq_len, seed, flags
        if flags is not None and len(flags) != len(stream):
            raise DataError(f"{len(flags)} flags for {len(stream)} tokens: the shards are damaged")
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
        rows = np.stack([self.sample(w) for w in windows])
        if self.flags is None:
            t = torch.from_numpy(rows)
            return Batch(t[:, :-1].contiguous(), t[:, 1:].contiguous())
        flags = np.stack([self.flags.read(w * self.seq_len, self.seq_len + 1) for w in windows])
        return packed_batch(rows, flags)


def packed_batch(rows: np.ndarray, flags: np.ndarray) -> Batch:
    """Inputs, masked targets and per-record positions of windows of ``T + 1`` tokens and their flags."""
    target_flags = flags[:, 1:]
    keep = ((target_flags & LOSS_FLAG) != 0) & ((target_flags & RECORD_START_FLAG) == 0)
    targets = np.where(keep, rows[:, 1:], IGNORE)
    starts = (flags[:, :-1] & RECORD_START_FLAG) != 0
    index = np.broadcast_to(np.arange(starts.shape[1]), starts.shape)
    # Position = distance from the latest record start at or before the token (from the window's
    # first token for the tail of a record that began in an earlier window).
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return Batch(
        torch.from_numpy(np.ascontiguousarray(rows[:, :-1])),
        torch.from_numpy(targets),
        torch.from_numpy(np.ascontiguousarray(index - last_start)),
    )


class Samples(Protocol):
    """What the loaders draw from: ``count`` samples, an order per epoch, a batch of sample ids."""

    count: int

    def order(self, epoch: int) -> np.ndarray: ...

    def batch(self, ids: list[int]) -> Batch: ...


class Records:
    """Padded supervised data: sample ``i`` is record ``i`` (found by its record-start flag)."""

    def __init__(self, stream: TokenStream, flags: TokenStream, seq_len: int, seed: int, pad_id: int) -> None:
        if len(flags) != len(stream):
            raise DataError(f"{len(flags)} flags for {len(stream)} tokens: the shards are damaged")
        self.stream, self.flags, self.seq_len, self.seed, self.pad_id = stream, flags, seq_len, seed, pad_id
        starts = [
            np.flatnonzero(m & RECORD_START_FLAG) + int(base)
            for m, base in zip(flags.maps, flags.starts[:-1], strict=True)
        ]
        self.bounds = np.concatenate([*starts, np.asarray([len(stream)], dtype=np.int64)]).astype(np.int64)
        self.count = len(self.bounds) - 1
        if self.count < 1:
            raise DataError("split holds no record")
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng(self.seed + epoch).permutation(self.count))
        return self._order[1]

    def batch(self, ids: list[int]) -> Batch:
        spans = [
            (int(self.bounds[i]), min(int(self.bounds[i + 1]), int(self.bounds[i]) + self.seq_len + 1))
            for i in ids
        ]
        width = max(end - start for start, end in spans) - 1
        inputs = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        targets = np.full((len(ids), width), IGNORE, dtype=np.int64)
        for row, (start, end) in enumerate(spans):
            tokens, flags = self.stream.read(start, end - start), self.flags.read(start, end - start)
            n = end - start - 1
            inputs[row, :n] = tokens[:-1]
            targets[row, :n] = np.where((flags[1:] & LOSS_FLAG) != 0, tokens[1:], IGNORE)
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets))


def open_split(
    data_dir: str | Path, manifest: DataManifest, split: str, seq_len: int, seed: int
) -> Windows | Records:
    """The samples of ``split`` as its manifest says: windows of text or packed records, or padded records."""
    stream = TokenStream(split_files(data_dir, manifest, split), manifest.dtype)
    flags = flag_files(data_dir, manifest, split)
    if flags is None:
        return Windows(stream, seq_len, seed)
    flag_stream = TokenStream(flags, "uint8")
    if manifest.packing == "Padded":
        return Records(stream, flag_stream, seq_len, seed, manifest.pad_id)
    return Windows(stream, seq_len, seed, flag_stream)


class TrainLoader:
    """Micro-batches for one rank, produced ahead of time by a background thread.

    ``position`` always describes the batches *handed out*, not the ones prefetched, so checkpointing
    it and restarting from it replays nothing and skips nothing.
    """

    def __init__(
        self,
        windows: Samples,
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
        # A position from another world size may fall in this world's dropped ragged tail.
        tail = position.batch >= self.per_epoch
        self.position = Position(position.epoch + 1, 0) if tail else Position(position.epoch, position.batch)
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
    windows: Samples, micro_batch: int, rank: int, world: int, max_batches: int
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
