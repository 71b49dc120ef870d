"""Where a model, tokenizer or data file comes from: one parser for the operator and the trainer.

A source is written as a URI in the spec. The operator reads it to know what a pod needs (a hub
token, a volume); the trainer reads it to fetch the files. Both go through ``parse`` so a new kind
(the storage issue's credentials and extra volumes) is added in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

SOURCE_DESCRIPTION = (
    "hf://ORG/NAME (the Hugging Face hub, through hub.cacheDir and hub.endpoint), an object-store URL"
    " (s3://, gs://, az://; fsspec), file:///ABSOLUTE/PATH, or a path: absolute (another volume"
    " mounted in the pod) or relative to the job's volume."
)
OBJECT_SCHEMES = ("s3", "gs", "gcs", "az", "abfs")
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class SourceKind(StrEnum):
    HUB = "hub"
    OBJECT = "object"
    PATH = "path"


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    location: str
    """The hub repo id, the object-store URL, or the filesystem path (relative to the job volume when not absolute)."""

    @property
    def relative(self) -> bool:
        return self.kind is SourceKind.PATH and not self.location.startswith("/")


def source_problem(uri: str) -> str | None:
    """Why ``uri`` is not a source, or None."""
    match = _SCHEME.match(uri)
    if match is None:
        return "a path must not start with '-'" if uri.startswith("-") else None
    scheme, rest = match.groups()
    if scheme == "hf":
        return None if _HUB_ID.match(rest) else f"{uri!r}: expected hf://ORG/NAME"
    if scheme == "file":
        return None if rest.startswith("/") else f"{uri!r}: expected file:///ABSOLUTE/PATH"
    if scheme in OBJECT_SCHEMES:
        return None if rest else f"{uri!r}: no bucket"
    return f"{uri!r}: unsupported scheme {scheme}:// (hf, s3, gs, az, file or a path)"


def parse(uri: str) -> Source:
    """The source ``uri`` names; ValueError when it names none."""
    if (problem := source_problem(uri)) is not None:
        raise ValueError(problem)
    match = _SCHEME.match(uri)
    if match is None:
        return Source(SourceKind.PATH, uri)
    scheme, rest = match.groups()
    if scheme == "hf":
        return Source(SourceKind.HUB, rest)
    if scheme == "file":
        return Source(SourceKind.PATH, rest)
    return Source(SourceKind.OBJECT, uri)
