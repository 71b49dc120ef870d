"""The configuration a training pod receives: the job's spec plus its identity and paths.

The operator renders it into the job's ConfigMap; ``llmtrain`` reads it from a file. It embeds the
very same ``LLMTrainingJobSpec``, so the pod validates exactly what the apiserver admitted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from llmop_contract.api.base import ApiModel
from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec


class RunIdentity(ApiModel):
    """Which job and gang attempt this configuration belongs to."""

    job_name: str = Field("local", min_length=1, max_length=63)
    """LLMTrainingJob name."""
    namespace: str = Field("default", min_length=1, max_length=63)
    """LLMTrainingJob namespace."""
    attempt: int = Field(0, ge=0)
    """Gang attempt; grows by one on every restart."""


class Paths(ApiModel):
    """Where the stages read and write, usually on the job's shared volume."""

    volume_dir: str = Field("work", min_length=1)
    """The job's volume: relative model and tokenizer sources resolve against it, and fetched ones are cached there."""
    data_dir: str = Field("work/data", min_length=1)
    """Prepared shards, manifest and tokenizer."""
    checkpoint_dir: str = Field("work/checkpoints", min_length=1)
    """Checkpoints, one directory per step, with a `latest` pointer."""
    output_dir: str = Field("work/output", min_length=1)
    """Exported models and reports."""


class TrainerConfig(ApiModel):
    """Input of every `llmtrain` subcommand."""

    api_version: Literal["llmop.io/v1alpha1"] = "llmop.io/v1alpha1"
    """Schema version."""
    kind: Literal["TrainerConfig"] = "TrainerConfig"
    """Always TrainerConfig."""
    run: RunIdentity = Field(default_factory=RunIdentity)
    """Job identity."""
    paths: Paths = Field(default_factory=Paths)
    """Storage layout."""
    spec: LLMTrainingJobSpec
    """The LLMTrainingJob spec as admitted by the apiserver."""
    deepspeed_config: dict[str, Any] | None = None
    """DeepSpeed config rendered by the operator; unset renders it from spec in the trainer."""
