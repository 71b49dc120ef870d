"""Reading documents from local paths, object stores (s3://, gs://, az://) and the bundled corpora.

Object-store sources are opened through ``llmtrain.objectstore`` with ``spec.storage.objectStore``
(endpoint, region, addressing; credentials from the pod's environment): a single object or every
file under a prefix, exactly as a local file or directory.

Document boundaries per format:

* ``.txt`` (Text): one document per paragraph block, i.e. text separated by one or more blank lines.
  A plain text file is usually a book or a dump of many short texts; one document per file would make
  near-duplicate detection and the by-document validation split meaningless for it.
* ``.jsonl`` / ``.json`` / ``.ndjson`` (JSONL): one JSON object per line, text in ``textField``.
* ``.parquet`` (Parquet): one row per document, text in column ``textField``.
* ``builtin://NAME``: the records of a corpus shipped in ``llmtrain/corpus``.

Any of these may carry a compression suffix (``.gz``, ``.bz2``, ``.xz``, ``.zst``); fsspec decompresses.
A directory is read recursively in sorted path order, skipping files whose format cannot be inferred.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from llmop_contract.api.v1alpha1.data import DataSource, SourceFormat
from llmop_contract.api.v1alpha1.workload import ObjectStore
from llmtrain import corpus, objectstore
from llmtrain.config import ConfigError, DataError

BUILTIN = "builtin://"
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
_EXTENSIONS = {
    ".txt": SourceFormat.TEXT,
    ".text": SourceFormat.TEXT,
    ".jsonl": SourceFormat.JSONL,
    ".json": SourceFormat.JSONL,
    ".ndjson": SourceFormat.JSONL,
    ".parquet": SourceFormat.PARQUET,
    ".pq": SourceFormat.PARQUET,
}
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class InputFile:
    """One file of a source, resolved before any work so a bad URI fails early."""

    fs: Any
    path: str
    format: SourceFormat
    size: int
    mtime: str


@dataclass(frozen=True)
class ResolvedSource:
    """A source and the files it expands to (none for a builtin corpus)."""

    index: int
    source: DataSource
    files: tuple[InputFile, ...]

    @property
    def field(self) -> str:
        return f"spec.data.sources[{self.index}]"

    def fingerprint(self) -> list[dict[str, Any]]:
        """What decides whether the input changed: path, size and modification time of every file."""
        if self.source.uri.startswith(BUILTIN):
            return [{"builtin": self.source.uri, "sha256": _sha256_file(str(corpus.ENGLISH))}]
        return [
            {"path": f.path, "size": f.size, "mtime": f.mtime, "format": f.format.value} for f in self.files
        ]


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def infer_format(path: str) -> SourceFormat | None:
    """Format from the file name, looking through one compression suffix."""
    name = path.lower()
    for suffix in _COMPRESSION:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    for ext, fmt in _EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    return None


def resolve(index: int, source: DataSource, store: ObjectStore | None = None) -> ResolvedSource:
    """Expands a source into files, raising ConfigError naming the source when it cannot be read.

    Object-store URLs go through llmtrain.objectstore with ``store`` (spec.storage.objectStore):
    wrong credentials, a missing bucket or an endpoint that does not answer are DataError (exit 2).
    """
    field = f"spec.data.sources[{index}].uri"
    uri = source.uri
    if uri.startswith(BUILTIN):
        name = uri[len(BUILTIN) :]
        if name not in corpus.NAMES:
            raise ConfigError(field, f"unknown builtin corpus {name!r}; bundled: {', '.join(corpus.NAMES)}")
        return ResolvedSource(index, source, ())
    where = objectstore.safe_url(uri)
    try:
        fs, root = objectstore.filesystem(store or ObjectStore(), uri)
    except (ValueError, ImportError) as exc:
        raise ConfigError(field, f"cannot open {where!r}: {objectstore.redact(str(exc))}") from exc
    try:
        return ResolvedSource(index, source, tuple(_files(index, source, fs, root, where)))
    except ConfigError:
        raise
    except Exception as exc:
        raise _refusal(exc, uri, field) from exc


def _refusal(exc: Exception, uri: str, field: str) -> Exception:
    """DataError for a problem the user can fix (objectstore.describe), else ``exc`` itself."""
    described = objectstore.describe(exc, uri)
    return exc if described is None else DataError(field, described)


def _files(index: int, source: DataSource, fs: Any, root: str, where: str) -> list[InputFile]:
    # info, not exists: s3fs answers exists() with False for a missing bucket and for a refused
    # request alike, and info() raises what tells them apart.
    try:
        root_info = fs.info(root)
    except FileNotFoundError as exc:
        if objectstore.is_object_url(source.uri):
            raise  # objectstore.describe tells a missing bucket from a missing key
        raise DataError(f"spec.data.sources[{index}].uri", f"{where!r} does not exist") from exc
    explicit = source.format != SourceFormat.AUTO
    if root_info.get("type") == "directory":
        paths = sorted(p for p in fs.find(root) if explicit or infer_format(p) is not None)
        if not paths:
            raise ConfigError(
                f"spec.data.sources[{index}].uri",
                f"directory {where!r} holds no .txt, .jsonl or .parquet files",
            )
    else:
        paths = [root]
    files = []
    for p in paths:
        fmt = source.format if explicit else infer_format(p)
        if fmt is None:
            raise ConfigError(
                f"spec.data.sources[{index}].format", f"cannot infer the format of {p!r}; set format"
            )
        info = root_info if p == root else fs.info(p)
        mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or info.get("ETag") or ""
        files.append(InputFile(fs, p, fmt, int(info.get("size") or 0), str(mtime)))
    return files


def _compression(path: str) -> str | None:
    return "infer" if path.lower().endswith(_COMPRESSION) else None


def _read_text(f: InputFile) -> Iterator[str]:
    with f.fs.open(f.path, "rt", encoding="utf-8", errors="replace", compression=_compression(f.path)) as fh:
        content = fh.read()
    for block in _PARAGRAPH.split(content.replace("\r\n", "\n")):
        if block.strip():
            yield block.strip("\n")


def _read_jsonl(f: InputFile, text_field: str, counts: Counter[str]) -> Iterator[str]:
    with f.fs.open(f.path, "rt", encoding="utf-8", errors="replace", compression=_compression(f.path)) as fh:
        for line in fh:
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


def _read_parquet(f: InputFile, text_field: str, field: str, counts: Counter[str]) -> Iterator[str]:
    import pyarrow.parquet as pq  # only for Parquet sources: it costs every process ~0.1 s to import

    with f.fs.open(f.path, "rb", compression=_compression(f.path)) as fh:
        pf = pq.ParquetFile(fh)
        if text_field not in pf.schema_arrow.names:
            raise ConfigError(f"{field}.textField", f"{f.path!r} has no column {text_field!r}")
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str):
                    yield text
                else:
                    counts["missing_text_field"] += 1


def read(src: ResolvedSource, counts: Counter[str]) -> Iterator[str]:
    """Document texts of one source in a stable order; reader problems are tallied in ``counts``."""
    uri = src.source.uri
    if uri.startswith(BUILTIN):
        for record in corpus.load(uri[len(BUILTIN) :]):
            yield str(record["text"])
        return
    for f in src.files:
        if f.format == SourceFormat.TEXT:
            texts = _read_text(f)
        elif f.format == SourceFormat.JSONL:
            texts = _read_jsonl(f, src.source.text_field, counts)
        else:
            texts = _read_parquet(f, src.source.text_field, src.field, counts)
        yield from _guarded(texts, src)


# --- records, for the supervised formats ----------------------------------------------------------


def _jsonl_records(f: InputFile, counts: Counter[str]) -> Iterator[Any]:
    with f.fs.open(f.path, "rt", encoding="utf-8", errors="replace", compression=_compression(f.path)) as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                counts["malformed_record"] += 1


def _parquet_records(f: InputFile) -> Iterator[Any]:
    import pyarrow.parquet as pq

    with f.fs.open(f.path, "rb", compression=_compression(f.path)) as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=4096):
            yield from batch.to_pylist()


def read_records(src: ResolvedSource, counts: Counter[str]) -> Iterator[Any]:
    """Whole records of one source (JSON values, Parquet rows as dicts) in a stable order.

    Whether a record has the fields its format needs is the format's check (llmtrain.prepare.records);
    here only lines that are not JSON at all are tallied. Plain text has no fields: ConfigError.
    """
    uri = src.source.uri
    if uri.startswith(BUILTIN):
        for record in corpus.load(uri[len(BUILTIN) :]):
            yield dict(record)
        return
    for f in src.files:
        if f.format == SourceFormat.TEXT:
            raise ConfigError(
                f"{src.field}.format",
                f"{f.path!r} is plain text, but spec.data.format.type needs records: JSONL or Parquet",
            )
        yield from _guarded(
            _jsonl_records(f, counts) if f.format == SourceFormat.JSONL else _parquet_records(f), src
        )


def _guarded(items: Iterator[Any], src: ResolvedSource) -> Iterator[Any]:
    """``items``, with a read failure the user can fix (credentials revoked, bucket deleted since
    resolve) raised as DataError naming the source; anything else propagates (a crash, retried).
    Nothing read so far is kept on failure: prepare writes its shards only after every source."""
    try:
        yield from items
    except ConfigError:
        raise
    except Exception as exc:
        raise _refusal(exc, src.source.uri, f"{src.field}.uri") from exc
