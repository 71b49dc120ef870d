"""Where a job's files go under ``spec.storage.remote.uri``: one layout for the trainer and the operator.

The trainer uploads there; the operator reports the URIs in status and a later job can name one in
``training.checkpointing.resumeFrom``. Every uploaded tree ends with MARKER, written last: a reader
treats a tree without it as incomplete (an upload cut by a crash), so nothing partial is ever taken
for a checkpoint or a model.

    <uri>/checkpoints/step-00000100/...   one checkpoint, the same files as on the volume
    <uri>/checkpoints/step-00000100/llmop-upload.json
    <uri>/model/...                       the exported model (Hugging Face layout)
    <uri>/adapter/...                     a LoRA run's adapter alone (peft layout)
    <uri>/compressed/<stage>/...          each compression stage's model
"""

from __future__ import annotations

from typing import Final

MARKER: Final = "llmop-upload.json"
"""Uploaded last into every tree: {"files": {relative path: {"size", "sha256"}}, "step"?}."""
CHECKPOINTS: Final = "checkpoints"
MODEL: Final = "model"
ADAPTER: Final = "adapter"
COMPRESSED: Final = "compressed"


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended, one '/' between each."""
    out = uri.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def checkpoint_tag(step: int) -> str:
    """A checkpoint's directory name, the same on the volume and remotely: step-00000100."""
    return f"step-{step:08d}"


def checkpoint_uri(remote: str, tag: str) -> str:
    return join(remote, CHECKPOINTS, tag)


def model_uri(remote: str) -> str:
    return join(remote, MODEL)


def adapter_uri(remote: str) -> str:
    return join(remote, ADAPTER)


def compressed_uri(remote: str, stage: str) -> str:
    return join(remote, COMPRESSED, stage)
