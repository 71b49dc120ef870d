"""The inputs cut into N contiguous slices of the global document order, balanced by bytes.

The global order is today's: source index, then document order within the source (its files in
sorted order). The units are whole small or compressed files, Parquet row groups, a builtin corpus's records,
and byte ranges of uncompressed text and JSONL files. Every input is laid end to end on one byte line
of ``total`` bytes; slice k owns the bytes ``[k*total//N, (k+1)*total//N)``. A unit that cannot be cut
goes to the slice its first byte lies in; a builtin corpus is cut between records; a text or JSONL
file is cut at the first *cut point* at or after each boundary inside it, so a document belongs to
the range its first byte is in:

* JSONL: the start of a line.
* plain text (a document per paragraph, readers._read_text): the end of ``X\\r?\\n[ \\t]*\\r?\\n``
  with X neither blank nor a newline, i.e. just after a blank line that follows a non-blank line.
  There readers' paragraph regex always splits, and its scan restarts, so reading the file in pieces
  that begin at such points yields exactly the documents of reading it whole.

Every pod computes the same plan from the config alone (file sizes, Parquet footers, and a bounded
forward scan for each cut point), and ``read_piece`` streams a piece in bounded blocks.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from llmop_contract.api.v1alpha1.data import SourceFormat
from llmtrain import corpus
from llmtrain.config import ConfigError
from llmtrain.prepare import readers

_BLOCK = 1 << 20
_TEXT_CUT = re.compile(rb"[^ \t\r\n]\r?\n[ \t]*\r?\n")
_LINE_CUT = re.compile(rb"\n")
# A match is only trusted when this many bytes follow it in the buffer (or the file ends): a
# blank line can hold spaces, and \r\n can straddle two blocks.
_TAIL = 4096


@dataclass(frozen=True)
class Piece:
    """One readable unit: ``[start, end)`` bytes of a file, one Parquet row group (``row_group``), a
    whole file (``start = 0, end = -1``), or records ``[start, end)`` of a builtin corpus (``file = -1``)."""

    source: int
    file: int
    start: int
    end: int
    row_group: int = -1


@dataclass(frozen=True)
class _Unit:
    piece: Piece
    size: int
    splittable: bool


def _units(sources: list[readers.ResolvedSource]) -> list[_Unit]:
    units: list[_Unit] = []
    for src in sources:
        if src.source.uri.startswith(readers.BUILTIN):
            sizes = _builtin_sizes(src)
            units.append(_Unit(Piece(src.index, -1, 0, len(sizes)), max(sum(sizes), 1), True))
            continue
        for fi, f in enumerate(src.files):
            compressed = readers._compression(f.path) is not None
            if f.format == SourceFormat.PARQUET and not compressed:
                import pyarrow.parquet as pq  # only for Parquet sources (see readers)

                with f.fs.open(f.path, "rb") as fh:
                    meta = pq.ParquetFile(fh).metadata
                for g in range(meta.num_row_groups):
                    size = max(int(meta.row_group(g).total_byte_size), 1)
                    units.append(_Unit(Piece(src.index, fi, 0, -1, g), size, False))
                continue
            splittable = not compressed and f.format in (SourceFormat.TEXT, SourceFormat.JSONL)
            end = f.size if splittable else -1
            units.append(_Unit(Piece(src.index, fi, 0, end), max(f.size, 1), splittable))
    return units


def _builtin_records(src: readers.ResolvedSource) -> list[str]:
    # The bundled corpora are small and built in memory by corpus.load anyway.
    return [str(r["text"]) for r in corpus.load(src.source.uri[len(readers.BUILTIN) :])]


def _builtin_sizes(src: readers.ResolvedSource) -> list[int]:
    return [len(t.encode()) for t in _builtin_records(src)]


def _builtin_cut(sizes: list[int], offset: int, limit: int) -> int | None:
    """The first record starting at or after byte ``offset`` of the corpus, as a record index."""
    at = 0
    for i, size in enumerate(sizes):
        if at >= offset:
            return i if at < limit else None
        at += size
    return None


def _next_cut(f: readers.InputFile, offset: int, limit: int) -> int | None:
    """The first cut point found scanning from ``offset`` (< ``limit``), or None before ``limit``."""
    pattern = _TEXT_CUT if f.format == SourceFormat.TEXT else _LINE_CUT
    # JSONL: a line starts at `offset` when the byte before it is a newline, so scan from there.
    pos = offset - 1 if pattern is _LINE_CUT else offset
    buf = b""
    with f.fs.open(f.path, "rb") as fh:
        fh.seek(pos)
        base = pos
        while base + len(buf) < limit + _TAIL:
            block = fh.read(_BLOCK)
            eof = len(block) < _BLOCK
            buf += block
            for m in pattern.finditer(buf):
                if m.end() + _TAIL > len(buf) and not eof:
                    break  # too near the end to be sure; look again with the next block
                cut = base + m.end()
                return cut if cut < limit else None
            if eof:
                return None
            keep = max(len(buf) - 2 * _TAIL, 0)
            base, buf = base + keep, buf[keep:]
    return None


def plan(sources: list[readers.ResolvedSource], n: int) -> list[list[Piece]]:
    """The pieces of each of the ``n`` slices, in global order (some slices may be empty)."""
    units = _units(sources)
    total = sum(u.size for u in units)
    bounds = [k * total // n for k in range(n + 1)]
    slices: list[list[Piece]] = [[] for _ in range(n)]
    at = 0

    def slice_of(offset: int) -> int:
        k = 0
        while k + 1 < n and bounds[k + 1] <= offset:
            k += 1
        return k

    for u in units:
        first = slice_of(at)
        if not u.splittable:
            slices[first].append(u.piece)
            at += u.size
            continue
        src = sources[u.piece.source]
        builtin = u.piece.file < 0
        sizes = _builtin_sizes(src) if builtin else []
        starts: list[tuple[int, int]] = [(0, first)]
        for k in range(first + 1, n):
            local = bounds[k] - at
            if local >= u.size:
                break
            limit = min(bounds[k + 1] - at, u.size)
            if builtin:
                cut = _builtin_cut(sizes, max(local, 1), limit)
            else:
                cut = _next_cut(src.files[u.piece.file], max(local, 1), limit)
            if cut is not None and cut > starts[-1][0]:
                starts.append((cut, k))
        # A file's pieces are byte ranges; a builtin corpus's are record ranges.
        end = u.piece.end
        for (lo, k), nxt in zip(starts, [*starts[1:], (end, -1)], strict=True):
            slices[k].append(Piece(u.piece.source, u.piece.file, lo, nxt[0]))
        at += u.size
    return slices


# --- reading a piece ------------------------------------------------------------------------------


def _chunks(f: readers.InputFile, start: int, end: int, pattern: re.Pattern[bytes]) -> Iterator[bytes]:
    """``[start, end)`` of the file in pieces that each end at a cut point (or at ``end``)."""
    buf = b""
    with f.fs.open(f.path, "rb") as fh:
        fh.seek(start)
        left = end - start
        while left > 0:
            block = fh.read(min(_BLOCK, left))
            if not block:
                break
            left -= len(block)
            buf += block
            last = None
            for m in pattern.finditer(buf, max(len(buf) - len(block) - _TAIL, 0)):
                last = m
            if last is not None and left > 0:
                yield buf[: last.end()]
                buf = buf[last.end() :]
    if buf:
        yield buf


def _universal(raw: bytes) -> str:
    # What text mode with universal newlines makes of the bytes (readers open files with "rt").
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def _text_docs(f: readers.InputFile, start: int, end: int) -> Iterator[str]:
    for chunk in _chunks(f, start, end, _TEXT_CUT):
        for block in readers._PARAGRAPH.split(_universal(chunk)):
            if block.strip():
                yield block.strip("\n")


def _jsonl_docs(
    f: readers.InputFile, start: int, end: int, text_field: str, counts: Counter[str]
) -> Iterator[str]:
    for chunk in _chunks(f, start, end, _LINE_CUT):
        for line in _universal(chunk).split("\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                counts["malformed_record"] += 1
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if isinstance(text, str):
                yield text
            else:
                counts["missing_text_field"] += 1


def _row_group_docs(
    f: readers.InputFile, group: int, src: readers.ResolvedSource, counts: Counter[str]
) -> Iterator[str]:
    import pyarrow.parquet as pq

    text_field = src.source.text_field
    with f.fs.open(f.path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        if text_field not in pf.schema_arrow.names:
            raise ConfigError(f"{src.field}.textField", f"{f.path!r} has no column {text_field!r}")
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096, row_groups=[group]):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str):
                    yield text
                else:
                    counts["missing_text_field"] += 1


def _whole_file(src: readers.ResolvedSource, fi: int) -> readers.ResolvedSource:
    return readers.ResolvedSource(src.index, src.source, (src.files[fi],))


def read_piece(sources: list[readers.ResolvedSource], piece: Piece, counts: Counter[str]) -> Iterator[str]:
    """The documents of one piece, in order, streamed; read failures are refused as readers does."""
    src = sources[piece.source]
    docs: Iterator[Any]
    if piece.file < 0:
        yield from _builtin_records(src)[piece.start : piece.end]
        return
    if piece.end < 0 and piece.row_group < 0:
        # A whole (compressed) file: readers' own code reads it.
        yield from readers.read(_whole_file(src, piece.file), counts)
        return
    f = src.files[piece.file]
    if piece.row_group >= 0:
        docs = _row_group_docs(f, piece.row_group, src, counts)
    elif f.format == SourceFormat.TEXT:
        docs = _text_docs(f, piece.start, piece.end)
    else:
        docs = _jsonl_docs(f, piece.start, piece.end, src.source.text_field, counts)
    yield from readers._guarded(docs, src)
