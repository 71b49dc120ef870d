"""What crosses the pod boundary between the operator and ``llmtrain``, defined once for both sides.

The operator builds pods (environment, stage names, metrics port) and later reads what the trainer
left behind (exit code, termination message, Prometheus samples); the trainer reads the environment
and writes those. Anything one side writes and the other reads is named here, so a rename is one
edit and a mismatch is a type error rather than a string that silently stops matching.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field


class ExitCode(IntEnum):
    """``llmtrain`` exit codes; the operator's restart policy keys on them."""

    OK = 0
    FAILED = 1
    """A crash: retried up to spec.failurePolicy.backoffLimit."""
    BAD_CONFIG = 2
    """The configuration is invalid and nothing was started: retrying cannot help."""
    PREEMPTED = 75
    """EX_TEMPFAIL: SIGTERM received, checkpoint written; restart to resume (not a failure)."""


# --- Stage names ----------------------------------------------------------------------------------


class StageKind(StrEnum):
    QUANTIZE = "quantize"
    PRUNE = "prune"
    DISTILL = "distill"


class ModelLayout(StrEnum):
    """How a model directory's weights are stored (the ``layout`` of its ``compression.json``)."""

    HF = "hf"
    """A plain Hugging Face checkpoint (the trained export, pruned, distilled): transformers and vLLM load it."""
    QUANTIZED = "quantized"
    """The trainer's quantised buffers per module: only ``llmtrain.compress.load`` loads it."""

    @classmethod
    def written_by(cls, kind: StageKind | None) -> ModelLayout:
        """What a stage of ``kind`` writes (None: the trained export)."""
        return cls.QUANTIZED if kind is StageKind.QUANTIZE else cls.HF


_STAGE_NAME = re.compile(r"^(quantize|prune)-(0|[1-9][0-9]?)$|^distill$")


@dataclass(frozen=True)
class StageName:
    """A post-training stage: ``quantize-<i>`` / ``prune-<i>`` (index into the spec's list) or ``distill``.

    The operator names child Jobs and status entries with ``str(stage)``; ``llmtrain compress
    --stage`` parses it back with ``StageName.parse``.
    """

    kind: StageKind
    index: int | None = None

    def __post_init__(self) -> None:
        if (self.kind is StageKind.DISTILL) != (self.index is None):
            raise ValueError(f"stage {self.kind.value}: an index is required for quantize/prune only")

    def __str__(self) -> str:
        return self.kind.value if self.index is None else f"{self.kind.value}-{self.index}"

    @classmethod
    def parse(cls, text: str) -> StageName:
        match = _STAGE_NAME.match(text)
        if match is None:
            raise ValueError(f"{text!r}: expected quantize-<i>, prune-<i> or distill")
        if match.group(1) is None:
            return cls(StageKind.DISTILL)
        return cls(StageKind(match.group(1)), int(match.group(2)))


def quantize(index: int) -> StageName:
    return StageName(StageKind.QUANTIZE, index)


def prune(index: int) -> StageName:
    return StageName(StageKind.PRUNE, index)


DISTILL: Final = StageName(StageKind.DISTILL)


# --- Environment ----------------------------------------------------------------------------------


class Env(StrEnum):
    """Environment variables the operator sets on trainer containers (or a launcher on its child)."""

    JOB_NAME = "LLMOP_JOB_NAME"
    JOB_NAMESPACE = "LLMOP_JOB_NAMESPACE"
    ATTEMPT = "LLMOP_ATTEMPT"
    """The gang's attempt number: restarts increment it."""
    METRICS_PORT = "LLMOP_METRICS_PORT"
    """Rank 0 serves Prometheus metrics here; the operator scrapes progress from it."""
    METRICS_ADDR = "LLMOP_METRICS_ADDR"
    """The pod IP (downward API): where rank 0 binds its metrics server."""
    NODE_ADDR = "LLMOP_NODE_ADDR"
    """The worker's stable name through the headless Service (``<hostname>.<subdomain>.<ns>.svc``):
    torchrun's c10d rendezvous orders the nodes by it, so worker 0 is group rank 0 (the rank the
    operator scrapes), and the ranks' MASTER_ADDR is worker 0's."""
    PEAK_FLOPS = "LLMOP_PEAK_FLOPS"
    """Overrides the per-device peak FLOP/s table for MFU."""
    TERMINATION_LOG = "LLMOP_TERMINATION_LOG"
    """Where to write the termination message instead of /dev/termination-log."""
    STATUS_FILE = "LLMTRAIN_STATUS_FILE"
    """Set by ``llmtrain launch`` for its ranks: rank 0 writes "preempted" there before exiting."""
    LOG_FORMAT = "LLMTRAIN_LOG_FORMAT"
    """``json`` for JSON log lines, else logfmt."""


# --- Prometheus metrics the operator reads from rank 0 --------------------------------------------


class Metric(StrEnum):
    """Trainer metrics the operator scrapes into status.progress (the trainer exports more)."""

    STEP = "llmtrain_step"
    TOTAL_STEPS = "llmtrain_total_steps"
    LOSS = "llmtrain_loss"
    VALIDATION_LOSS = "llmtrain_validation_loss"
    VALIDATION_STEP = "llmtrain_validation_step"
    TOKENS_PER_SECOND = "llmtrain_tokens_per_second"
    ETA_SECONDS = "llmtrain_eta_seconds"
    CHECKPOINT_FALLBACKS = "llmtrain_checkpoint_fallbacks"
    """Checkpoints rejected at the last resume (missing manifest, size or checksum mismatch; set aside as
    ``rejected-<tag>`` in the checkpoint directory): the run fell back to an older one, or to scratch
    when this equals the number it found. 0 on a clean resume or a first start."""
    RESUMED_FROM_STEP = "llmtrain_resumed_from_step"
    """Step of the checkpoint the run resumed from; 0 when it started from scratch."""
    RESUMED_FROM_REMOTE = "llmtrain_resumed_from_remote"
    """1 when the volume had no usable checkpoint and the run restored one from storage.remote (or
    training.checkpointing.resumeFrom), else 0."""
    REMOTE_CHECKPOINT_STEP = "llmtrain_remote_checkpoint_step"
    """Step of the newest checkpoint complete under storage.remote (its marker uploaded); 0 for none."""
    REMOTE_UPLOADS_PENDING = "llmtrain_remote_uploads_pending"
    """Checkpoints saved on the volume and not yet complete remotely (queued or uploading)."""
    REMOTE_UPLOAD_FAILURES = "llmtrain_remote_upload_failures_total"
    """Upload attempts that failed (a counter: each is retried with backoff)."""
    REMOTE_UPLOAD_FAILING = "llmtrain_remote_upload_failing"
    """1 while the latest attempt of some upload failed and it has not succeeded since, else 0."""
    CHECKPOINT_SECONDS = "llmtrain_checkpoint_seconds"
    """Duration of the last checkpoint save (0 before the first): the input of the recommended interval."""
    ENERGY_AVAILABLE = "llmtrain_energy_available"
    """1 when every rank's devices report energy (NVML, RAPL), else 0: the energy series are then absent."""
    ENERGY_JOULES = "llmtrain_energy_joules"
    """Energy of the job's devices so far, all ranks, all attempts up to the checkpoint resumed from."""
    JOULES_PER_TOKEN = "llmtrain_energy_joules_per_token"
    """ENERGY_JOULES per trained token."""
    PRODUCTIVE_SECONDS = "llmtrain_productive_seconds"
    """Seconds spent on the steps the model kept: every attempt's steps up to the checkpoint the next one
    resumed from, plus this attempt's; steps recomputed after a restart count once. Over the job's wall
    time this is its goodput."""


# --- Termination message --------------------------------------------------------------------------

TERMINATION_LOG_PATH: Final = "/dev/termination-log"
# The kubelet keeps at most 4096 bytes per container; a longer message would be cut mid-JSON.
TERMINATION_LIMIT: Final = 4096
# status.stages[].results is bounded (maxProperties 64).
MAX_RESULTS: Final = 64


class TerminationMessage(BaseModel):
    """A stage's last words, which the kubelet copies into the pod's status when the container exits.

    The operator reads a stage's key figures from the pod object, with no API permission for the
    trainer and without reading the job's volume.
    """

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    step: int | None = None
    total_steps: int | None = Field(default=None, alias="totalSteps")
    loss: float | None = None
    validation_loss: float | None = Field(default=None, alias="validationLoss")
    validation_step: int | None = Field(default=None, alias="validationStep")
    results: dict[str, float] = Field(default_factory=dict)
    """A compression or export stage's figures: sizeRatio, perplexityIncreasePercent, speedup, ..."""
    model_path: str | None = Field(default=None, alias="modelPath")
    """Where the stage wrote its model, relative to the job volume's root or absolute."""
    model_uri: str | None = Field(default=None, alias="modelUri")
    """Where the stage uploaded its model under storage.remote.uri (complete: its marker is there)."""
    resumed_from_step: int | None = Field(default=None, alias="resumedFromStep")
    """Training: the checkpoint step this attempt resumed from (0: it started afresh)."""
    checkpoint_fallbacks: int | None = Field(default=None, alias="checkpointFallbacks")
    """Training: newer checkpoints that failed verification and were set aside."""
    resumed_from_remote: bool | None = Field(default=None, alias="resumedFromRemote")
    """Training: the volume had no usable checkpoint, so it was restored from remote storage."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Further trainer-side fields (reason, problems, ...) kept in the message for humans."""
    truncated: bool = False
    """Set when entries were dropped to fit TERMINATION_LIMIT."""

    def encode(self) -> str:
        """Compact JSON within TERMINATION_LIMIT; drops the largest entries first if it does not fit."""
        data = self.model_dump(by_alias=True, exclude_none=True, exclude={"extra", "truncated"})
        data = {k: v for k, v in data.items() if v != {}}
        data.update(self.extra)
        text = _dumps(data)
        while len(text.encode()) > TERMINATION_LIMIT and data:
            largest = max(data, key=lambda k: len(json.dumps(data[k], default=str)))
            data.pop(largest)
            data["truncated"] = True
            text = _dumps(data)
        return text

    @classmethod
    def decode(cls, text: str | None) -> TerminationMessage:
        """Lenient: the message is untrusted text (a crash leaves its last log lines there), so each
        field that is not of the expected shape is dropped instead of failing the reconcile."""
        try:
            raw = json.loads(text) if text else {}
        except ValueError:
            return cls()
        if not isinstance(raw, dict):
            return cls()
        fields: dict[str, Any] = {}
        for key in ("step", "totalSteps", "validationStep", "resumedFromStep", "checkpointFallbacks"):
            if (number := _finite(raw.get(key))) is not None:
                fields[key] = int(number)
        for key in ("loss", "validationLoss"):
            if (number := _finite(raw.get(key))) is not None:
                fields[key] = number
        results = raw.get("results")
        if isinstance(results, dict):
            fields["results"] = {
                str(k): n for k, v in list(results.items())[:MAX_RESULTS] if (n := _finite(v)) is not None
            }
        for key in ("modelPath", "modelUri"):
            if isinstance(value := raw.get(key), str) and value:
                fields[key] = value
        if isinstance(value := raw.get("resumedFromRemote"), bool):
            fields["resumedFromRemote"] = value
        fields["truncated"] = raw.get("truncated") is True
        fields["extra"] = {k: v for k, v in raw.items() if k not in _KNOWN}
        return cls.model_validate(fields)


_KNOWN = frozenset(
    {
        "step",
        "totalSteps",
        "loss",
        "validationLoss",
        "validationStep",
        "results",
        "modelPath",
        "modelUri",
        "resumedFromStep",
        "checkpointFallbacks",
        "resumedFromRemote",
        "truncated",
    }
)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True, default=str)


# --- Data manifest --------------------------------------------------------------------------------

MANIFEST_FILE: Final = "manifest.json"
SHARD_FORMAT: Final = "llmop-shards-v1"


FLAGS_SUFFIX: Final = ".flags.bin"
LOSS_FLAG: Final = 1
"""Bit 0 of a flags byte: this token counts in the loss as a target (a completion or assistant token)."""
RECORD_START_FLAG: Final = 2
"""Bit 1 of a flags byte: this token starts a record (nothing is predicted across the boundary)."""


class Shard(BaseModel):
    model_config = ConfigDict(extra="ignore")

    file: str
    """Relative to the data directory: ``<split>-NNNNN.bin``, raw little-endian token ids."""
    tokens: int = Field(ge=0)
    sha256: str
    flags_sha256: str | None = None
    """Supervised data only: checksum of the companion ``<split>-NNNNN.flags.bin``, one uint8 per token
    (LOSS_FLAG, RECORD_START_FLAG). None for plain text, where every token is a target."""
    records: int = Field(0, ge=0)
    """Supervised data only: records starting in this shard (tokens flagged RECORD_START_FLAG)."""

    @property
    def flags_file(self) -> str | None:
        return None if self.flags_sha256 is None else self.file.removesuffix(".bin") + FLAGS_SUFFIX


class DataManifest(BaseModel):
    """``<data_dir>/manifest.json``: what the prepare stage wrote and the train stage reads.

    Written last (atomically), so its presence means the shards it lists are complete.
    """

    model_config = ConfigDict(extra="ignore")

    format: Literal["llmop-shards-v1"] = SHARD_FORMAT
    dtype: Literal["uint16", "uint32"]
    vocab_size: int = Field(gt=0)
    eos_id: int = Field(ge=0)
    pad_id: int = Field(ge=0)
    tokenizer: str = "tokenizer.json"
    splits: dict[str, list[Shard]]
    stats: dict[str, Any] = Field(default_factory=dict)
    """Counts and timings of the run that wrote it (documents in/out, duplicates removed, ...)."""
    config_hash: str = ""
    """Fingerprint of the inputs and the data spec: a re-run with the same one has nothing to do."""
    record_format: Literal["Text", "PromptCompletion", "Chat", "Template"] = "Text"
    """spec.data.format.type the shards were made with; every format but Text has flags files."""
    packing: Literal["Packed", "Padded"] = "Packed"
    """spec.data.format.packing: windows over concatenated records, or one padded record per row."""

    @property
    def supervised(self) -> bool:
        return self.record_format != "Text"

    def records(self, split: str) -> int:
        return sum(s.records for s in self.splits.get(split, []))

    def files(self, split: str) -> list[str]:
        return [s.file for s in self.splits.get(split, [])]

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.splits.get(split, []))

    def dump(self) -> str:
        return self.model_dump_json(indent=1)
