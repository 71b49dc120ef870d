"""What every phase shares: the run's context, document ids and the per-document hashes.

Two ids, both int64 and both sorting in global document order:

* ``ord = pod << 40 | row``: where a document's cleaned text, signature and row record sit in the
  scan outputs (row = its index among pod ``pod``'s cleaned documents). Slices are contiguous in the
  global order, so ords sort globally; they depend on N and never leave the work directory.
* ``gid = source << 40 | j`` with j the document's index within its source, as today's report
  origins ``<uri>#<j>`` count it. A scan pod only knows j relative to its slice; the later phases add
  the documents of the same source in earlier slices (from the scan markers). gids do not depend on N,
  so the train/val split and the tokenizer sample, hashed from them, are the same for any pod count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmop_contract.api.v1alpha1.data import PreparePhase
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.protocol import TerminationMessage
from llmtrain import termination
from llmtrain.prepare import readers
from llmtrain.prepare.distributed.work import Work

log = logging.getLogger("llmtrain.prepare")

SHIFT = 40
ROW_MASK = (1 << SHIFT) - 1
# Per cleaned document in a scan pod's rows file: source index, index j within the source's part of
# this slice, UTF-8 bytes of the cleaned text.
ROW_DTYPE = np.dtype([("source", "<i8"), ("j", "<i8"), ("nbytes", "<i8")])
_SPLIT_SALT = np.uint64(0x5851F42D4C957F2D)
_SAMPLE_SALT = np.uint64(0x2545F4914F6CDD1D)


@dataclass
class Context:
    config: TrainerConfig
    sources: list[readers.ResolvedSource]
    pods: int
    work: Work
    config_hash: str

    @property
    def data_dir(self) -> Path:
        return Path(self.config.paths.data_dir)


def mix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser: a well-mixed 64-bit hash of each element."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def unit_hash(gid: npt.NDArray[np.int64], salt: int) -> npt.NDArray[np.float64]:
    """A uniform value in [0, 1) per gid, fixed by ``salt``."""
    with np.errstate(over="ignore"):
        h = mix64(gid.astype(np.uint64) ^ mix64(np.array([salt], dtype=np.uint64)))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_hash(gid: npt.NDArray[np.int64], seed: int) -> npt.NDArray[np.float64]:
    """The split's hash: a document is validation when this is below validationFraction."""
    return unit_hash(gid, int(np.uint64(seed) ^ _SPLIT_SALT))


def sample_hash(gid: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """The tokenizer sample's hash (independent of the split's)."""
    return unit_hash(gid, int(_SAMPLE_SALT))


def source_prefix(ctx: Context) -> npt.NDArray[np.int64]:
    """``(pods, sources)``: documents of each source read by the earlier scan pods."""
    counts = np.zeros((ctx.pods, len(ctx.sources)), dtype=np.int64)
    for p in range(ctx.pods):
        for s, c in ctx.work.require(PreparePhase.SCAN, p)["per_source"].items():
            counts[p, int(s)] = c
    prefix = np.zeros_like(counts)
    np.cumsum(counts[:-1], axis=0, out=prefix[1:])
    return prefix


def rows(ctx: Context, pod: int) -> npt.NDArray[Any]:
    """Pod ``pod``'s row records, memory-mapped."""
    path = ctx.work.out(PreparePhase.SCAN, pod) / "rows.bin"
    if path.stat().st_size == 0:
        return np.empty(0, dtype=ROW_DTYPE)
    return np.memmap(path, dtype=ROW_DTYPE, mode="r")


def gids(rec: npt.NDArray[Any], prefix: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """gids of one pod's row records, given that pod's row of ``source_prefix``."""
    src = np.asarray(rec["source"], dtype=np.int64)
    j = np.asarray(rec["j"], dtype=np.int64)
    out: npt.NDArray[np.int64] = (src << SHIFT) | (prefix[src] + j)
    return out


def terminate(phase: str, index: int, results: dict[str, float]) -> None:
    termination.write(
        TerminationMessage(results=results, extra={"stage": "prepare", "phase": phase, "index": index})
    )
