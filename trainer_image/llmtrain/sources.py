"""Fetch a pretrained model or tokenizer to a local directory: from a path, the hub or an object store.

Every stage (prepare, train, compress, serve) calls ``resolve_model`` / ``resolve_tokenizer``; each
returns a directory ``from_pretrained`` can read. What a source is comes from
``llmop_contract.sources.parse``, the parser the operator uses too.

- A path is used in place; a relative one is on the job's volume (``paths.volume_dir``).
- ``hf://ORG/NAME`` goes through huggingface_hub's own ``snapshot_download`` into ``hub.cacheDir`` on
  the job's volume, so the first stage downloads and the others (and every rank) find it cached; a
  mirror is ``hub.endpoint``, a token comes from the environment (``HF_TOKEN``, which the operator
  fills from ``hub.tokenSecret``), and ``hub.offline`` reads the cache only (air-gapped clusters).
- An object-store URL (s3://, gs://, az://) is copied through ``llmtrain.objectstore`` (the endpoint,
  region and addressing of ``storage.objectStore``; credentials from the environment the operator
  fills from its ``credentialsSecret``) into ``model-cache/`` on the job's volume once; a marker file
  written last makes a half-finished copy (a crash, a preemption) count as absent.

A source that is missing, unreadable or not a causal LM is the user's to fix: ``DataError`` (exit 2,
never retried); so are wrong credentials, a missing bucket and an object store that does not answer
(after the filesystem's bounded retries). Any other failure (a 5xx, a connection dropped mid-copy)
propagates as a crash, which the operator retries.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import secrets
import shutil
from pathlib import Path
from typing import Any

from llmop_contract.api.v1alpha1.model import HubSettings, PretrainedModel
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.sources import Source, SourceKind, parse
from llmtrain import objectstore
from llmtrain.config import DataError

MODEL_FIELD = "spec.model.pretrained.uri"
TOKENIZER_FIELD = "spec.model.pretrained.tokenizer"
OBJECT_CACHE = "model-cache"
_COMPLETE = ".llmop-complete"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def pretrained(cfg: TrainerConfig) -> PretrainedModel:
    source = cfg.spec.model.pretrained
    if source is None:
        raise DataError("spec.model.pretrained", "the job trains a model from scratch; there is no source")
    return source


def _on_volume(cfg: TrainerConfig, path: str) -> Path:
    return Path(path) if path.startswith("/") else Path(cfg.paths.volume_dir) / path


def fetch(cfg: TrainerConfig, uri: str, field: str, revision: str | None = None) -> Path:
    """The local directory holding what ``uri`` names (downloaded or copied first when remote)."""
    try:
        source = parse(uri)
    except ValueError as exc:
        raise DataError(field, str(exc)) from exc
    if source.kind is SourceKind.HUB:
        return _from_hub(cfg, source, pretrained(cfg).hub, revision, field)
    if source.kind is SourceKind.OBJECT:
        return _from_object_store(cfg, source, field)
    path = _on_volume(cfg, source.location)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise DataError(field, f"{uri!r} ({path}) {what}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DataError(field, f"{uri!r} ({path}) cannot be read (permission denied)")
    return path


def _from_hub(cfg: TrainerConfig, source: Source, hub: HubSettings, revision: str | None, field: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = _on_volume(cfg, hub.cache_dir)
    where = f"hf://{source.location}" + (f"@{revision}" if revision else "")
    try:
        path = snapshot_download(
            source.location,
            revision=revision,
            cache_dir=cache,
            local_files_only=hub.offline,
            token=os.environ.get("HF_TOKEN") or None,
            endpoint=hub.endpoint,
        )
    except GatedRepoError as exc:  # before RepositoryNotFoundError, its base class
        raise DataError(field, f"{where} is gated: hub.tokenSecret must hold a token with access") from exc
    except RepositoryNotFoundError as exc:
        raise DataError(
            field, f"{where}: no such repository (or it is private: set hub.tokenSecret)"
        ) from exc
    except RevisionNotFoundError as exc:
        raise DataError("spec.model.pretrained.revision", f"{where}: no such revision") from exc
    except LocalEntryNotFoundError as exc:
        if not hub.offline:
            raise  # the hub could not be reached: transient, the operator retries
        raise DataError(field, f"{where} is not in the hub cache {cache} (hub.offline is true)") from exc
    return Path(str(path))


def _complete(local: Path) -> bool:
    """Whether ``local`` is a finished copy: its marker is there and every file it lists has its size."""
    try:
        marker = json.loads((local / _COMPLETE).read_text())
        files = marker["files"]
        return isinstance(files, dict) and all(
            (local / name).stat().st_size == size for name, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _from_object_store(cfg: TrainerConfig, source: Source, field: str) -> Path:
    """Copy the prefix ``source`` names into ``model-cache/`` once (through llmtrain.objectstore).

    The copy goes to a private temporary directory, each file's size is checked against the listing,
    the marker is written last and the directory renamed into place: a copy cut short (a crash, a
    preemption, a dropped connection) is never found complete, and the next stage copies it again.
    """
    url = source.location
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    local = Path(cfg.paths.volume_dir) / OBJECT_CACHE / key
    if _complete(local):
        return local
    where = objectstore.safe_url(url)
    tmp = local.with_name(f"{local.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fs, root = objectstore.filesystem(cfg.spec.storage.object_store, url)
        root = root.rstrip("/")
        listing = fs.find(root, detail=True)
        files: dict[str, int] = {}
        for remote, info in sorted(listing.items()):
            if info.get("type") == "directory":
                continue
            rel = posixpath.relpath(str(remote), root)
            if rel == ".":
                raise DataError(field, f"{where} is an object, not a directory (prefix) holding a model")
            if rel.startswith("../") or rel.startswith("/"):
                continue  # not under the prefix (a key with '..' in it): never written outside tmp
            files[rel] = int(info.get("size") or 0)
        if not files:
            raise DataError(
                field, f"{where} is not a directory (prefix) in the object store: nothing under it"
            )
        for rel, size in files.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(posixpath.join(root, rel), str(target))
            if target.stat().st_size != size:
                # Transient (a truncated transfer): a crash, so the operator retries the pod.
                raise OSError(f"{where}/{rel}: copied {target.stat().st_size} of {size} bytes")
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if (described := objectstore.describe(exc, url)) is not None:
            raise DataError(field, described) from exc
        raise
    # Written last: only a copy whose every file arrived has it.
    (tmp / _COMPLETE).write_text(json.dumps({"uri": where, "files": files}) + "\n")
    if local.exists() and not _complete(local):
        shutil.rmtree(local, ignore_errors=True)  # a copy of an older layout, or a damaged one
    try:
        os.replace(tmp, local)
    except OSError:
        # Another process (a rank, a stage on the same volume) finished the same copy first.
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(local):
            raise
    return local


def resolve_model(cfg: TrainerConfig) -> Path:
    """The pretrained model's directory; DataError when it holds no loadable causal LM config."""
    source = pretrained(cfg)
    path = fetch(cfg, source.uri, MODEL_FIELD, source.revision)
    if not (path / "config.json").is_file():
        raise DataError(MODEL_FIELD, f"{source.uri!r} ({path}) has no config.json: not a Hugging Face model")
    return path


def resolve_tokenizer(cfg: TrainerConfig) -> Path:
    """The tokenizer's directory: model.pretrained.tokenizer, or the model's own."""
    source = pretrained(cfg)
    if source.tokenizer is None:
        path, field, uri = resolve_model(cfg), MODEL_FIELD, source.uri
    else:
        field, uri = TOKENIZER_FIELD, source.tokenizer
        path = fetch(cfg, uri, field, source.revision if uri.startswith("hf://") else None)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(field, f"{uri!r} ({path}) holds no tokenizer ({', '.join(TOKENIZER_FILES)})")
    return path


def model_config(cfg: TrainerConfig) -> Any:
    """The model's transformers config; DataError for an architecture transformers does not know."""
    from transformers import AutoConfig

    source = pretrained(cfg)
    path = resolve_model(cfg)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=source.trust_remote_code)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        hint = (
            ""
            if source.trust_remote_code
            else " (trustRemoteCode is off: only architectures the installed transformers knows load)"
        )
        raise DataError(
            MODEL_FIELD, f"{source.uri!r}: cannot read its config: {_first_line(exc)}{hint}"
        ) from exc


def load_tokenizer(cfg: TrainerConfig) -> Any:
    """The tokenizer (a transformers PreTrainedTokenizer) from ``resolve_tokenizer``."""
    from transformers import AutoTokenizer

    source = pretrained(cfg)
    path = resolve_tokenizer(cfg)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=source.trust_remote_code)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        field = TOKENIZER_FIELD if source.tokenizer else MODEL_FIELD
        raise DataError(field, f"cannot load the tokenizer in {path}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
