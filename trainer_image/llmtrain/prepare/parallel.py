"""Chunked process-pool map with a periodic progress line."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

log = logging.getLogger("llmtrain.prepare")

T = TypeVar("T")
R = TypeVar("R")

# Below this many items a pool costs more to start than it saves.
MIN_PARALLEL_ITEMS = 2000
PROGRESS_SECONDS = 5.0


def workers(num_workers: int) -> int:
    """numWorkers, where 0 means every core."""
    return num_workers or os.cpu_count() or 1


def _context() -> mp.context.BaseContext:
    # fork starts workers in milliseconds and shares the already-imported modules; the pools run
    # before the tokenizer's Rust thread pool exists, which is what makes fork unsafe elsewhere.
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def map_chunks(
    fn: Callable[[Sequence[T]], R], items: Sequence[T], num_workers: int, label: str, chunk_size: int = 500
) -> Iterator[R]:
    """``fn`` over consecutive chunks of ``items``, results in input order, logging progress."""
    chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    n = workers(num_workers)
    start = last = time.monotonic()
    done = 0

    def progress(final: bool = False) -> None:
        nonlocal last
        now = time.monotonic()
        if final or now - last >= PROGRESS_SECONDS:
            last = now
            rate = done / max(now - start, 1e-9)
            log.info("%s: %d/%d docs, %.0f docs/s", label, done, len(items), rate)

    if n <= 1 or len(items) < MIN_PARALLEL_ITEMS:
        for chunk in chunks:
            yield fn(chunk)
            done += len(chunk)
            progress()
    else:
        with _context().Pool(min(n, len(chunks))) as pool:
            for chunk, result in zip(chunks, pool.imap(fn, chunks), strict=True):
                yield result
                done += len(chunk)
                progress()
    progress(final=True)
