"""Which compression a stage name asks for, and whether it can work on this model, checked up front.

Pure Python (no torch): ``llmtrain compress`` resolves and checks the stage in well under a second, so
a bad combination exits 2 with one line naming the field before any model is loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmop_contract.api.v1alpha1.lifecycle import (
    CompressionSpec,
    Distillation,
    Pruning,
    PruningMethod,
    Quantization,
    QuantizationMethod,
)
from llmop_contract.api.v1alpha1.model import ModelSpec, TransformerShape
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.protocol import StageKind, StageName
from llmtrain.config import ConfigError, DataError

DEFAULT_INT4_GROUP = 64
STRUCTURED_FAMILIES = ("llama", "mistral", "qwen2", "gemma")
"""Families whose blocks are self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj, separate matrices:
structured pruning removes heads and channels from those. Fused layouts (GPT-2's c_attn, Phi-3's
qkv_proj) are not supported."""
UNGATED_MLP = ("gpt2", "gpt_neox", "gpt_bigcode", "opt", "phi", "bloom", "falcon")
LEARNED_POSITIONS = ("gpt2", "gpt_bigcode", "opt")


class StageError(ConfigError):
    """The stage or its combination with the model is invalid (exit 2); the message names the field."""


class MissingModel(DataError):
    """There is no trained model to compress: exit 2, since a retry would find the same directory."""


@dataclass(frozen=True)
class ModelShape:
    """The trained model's shape, read from its config.json (the export, not the spec: HPO may vary it)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    context_length: int
    tie_embeddings: bool
    model_type: str = "llama"
    """config.json's model_type (the family): which structured pruning supports, and the block layout."""

    @classmethod
    def read(cls, model_dir: Path) -> ModelShape:
        path = model_dir / "config.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise MissingModel(
                f"no trained model at {model_dir} ({path.name}: {why}); run the train stage first"
            ) from exc
        try:
            return cls.from_config(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MissingModel(f"{path} is not a causal LM config this stage can read ({exc!r})") from exc

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> ModelShape:
        """From config.json as a dict; the names GPT-2-style configs use are read too (torch-free, so
        without transformers' attribute maps)."""

        def first(*names: str) -> Any:
            for name in names:
                if raw.get(name) is not None:
                    return raw[name]
            raise KeyError(names[0])

        hidden = int(first("hidden_size", "n_embd", "d_model"))
        heads = int(first("num_attention_heads", "n_head"))
        model_type = str(raw.get("model_type") or "llama")
        inner = raw.get("intermediate_size", raw.get("n_inner"))
        return cls(
            hidden_size=hidden,
            num_layers=int(first("num_hidden_layers", "n_layer")),
            num_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            intermediate_size=int(inner) if inner is not None else 4 * hidden,  # GPT-2's n_inner=None
            vocab_size=int(raw["vocab_size"]),
            context_length=int(first("max_position_embeddings", "n_positions")),
            tie_embeddings=bool(raw.get("tie_word_embeddings", True)),  # transformers' default
            model_type=model_type,
        )

    @property
    def gated_mlp(self) -> bool:
        """Three MLP matrices (gate, up, down) rather than two (GPT-2's fc and proj)."""
        return self.model_type not in UNGATED_MLP

    def num_parameters(self) -> int:
        attn = 2 * self.hidden_size * self.head_dim * (self.num_heads + self.num_key_value_heads)
        mlp = (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size
        block = attn + mlp + 2 * self.hidden_size
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        if self.model_type in LEARNED_POSITIONS:
            emb += self.context_length * self.hidden_size
        return self.num_layers * block + emb + self.hidden_size

    def in_features(self) -> dict[str, int]:
        """In-features of each kind of linear layer (what int4 groups must divide)."""
        return {
            "hiddenSize (q/k/v/gate/up projections)": self.hidden_size,
            "numHeads x headDim (o_proj)": self.num_heads * self.head_dim,
            "intermediateSize (down_proj)": self.intermediate_size,
        }


@dataclass(frozen=True)
class Stage:
    name: str
    """The stage as given: quantize-<i>, prune-<i> or distill."""
    kind: Literal["quantize", "prune", "distill"]
    """What it does."""
    field: str
    """The spec field it comes from, e.g. spec.compression.quantization[0]; error messages start with it."""
    spec: Quantization | Pruning | Distillation
    """That field's value."""

    @property
    def method(self) -> str:
        """Method name as reported: Int8WeightOnly, Int8Dynamic, Int4WeightOnly, Magnitude, Structured, Distillation."""
        if isinstance(self.spec, Distillation):
            return "Distillation"
        return str(self.spec.method.value)


def resolve(cfg: TrainerConfig, name: str) -> Stage:
    """The stage ``name`` of cfg.spec.compression, or StageError."""
    try:
        parsed = StageName.parse(name)
    except ValueError:
        raise StageError(f"--stage {name!r}: expected quantize-<i>, prune-<i> or distill") from None
    comp: CompressionSpec | None = cfg.spec.compression
    if comp is None:
        raise StageError(f"spec.compression: not set, so there is no stage {name!r}")
    if parsed.index is None:
        if comp.distillation is None:
            raise StageError("spec.compression.distillation: not set, so there is no stage 'distill'")
        return Stage(name, "distill", "spec.compression.distillation", comp.distillation)
    quantize, index = parsed.kind is StageKind.QUANTIZE, parsed.index
    items: list[Quantization] | list[Pruning] = comp.quantization if quantize else comp.pruning
    field = "spec.compression." + ("quantization" if quantize else "pruning")
    if index >= len(items):
        raise StageError(f"{field}[{index}]: no such entry (the list has {len(items)}), so no stage {name!r}")
    return Stage(name, "quantize" if quantize else "prune", f"{field}[{index}]", items[index])


def needs_train_split(stage: Stage) -> bool:
    """Whether the stage reads training windows (calibration, recovery or distillation), not only val."""
    spec = stage.spec
    if isinstance(spec, Pruning):
        return spec.method == PruningMethod.STRUCTURED or spec.recovery_steps > 0
    return isinstance(spec, Distillation)


def check_data(cfg: TrainerConfig, stage: Stage, shape: ModelShape) -> None:
    """DataError unless cfg.paths.dataDir holds what the stage reads: one evaluation window of the val
    split (evaluate.py), and a global batch of training windows when ``needs_train_split``."""
    from llmtrain import datacheck

    manifest = datacheck.read_manifest(cfg.paths.data_dir)
    seq = min(cfg.spec.training.sequence_length, shape.context_length)
    datacheck.check_split(cfg.paths.data_dir, manifest, "val", seq, 1, "evaluation")
    if needs_train_split(stage):
        micro = cfg.spec.training.micro_batch_size
        datacheck.check_split(
            cfg.paths.data_dir, manifest, "train", seq, micro, f"{stage.field} (microBatchSize {micro})"
        )


def kept(units: int, sparsity: float) -> int:
    """Units kept when removing ``sparsity`` of them: the nearest count, ties keeping one more."""
    return math.floor((1.0 - sparsity) * units + 0.5)


def head_units(shape: ModelShape) -> tuple[int, int]:
    """(units, query heads per unit) that structured pruning removes whole.

    With grouped-query attention a unit is one key/value head and the query heads that share it, so
    the pruned model is still a valid GQA model; with multi-head attention (and with a single
    key/value head) a unit is one query head.
    """
    if 1 < shape.num_key_value_heads < shape.num_heads:
        return shape.num_key_value_heads, shape.num_heads // shape.num_key_value_heads
    return shape.num_heads, 1


def check(stage: Stage, shape: ModelShape) -> None:
    """Raise StageError when the method and its parameters cannot work on a model of this shape."""
    spec = stage.spec
    if isinstance(spec, Quantization):
        if spec.method == QuantizationMethod.INT4_WEIGHT_ONLY:
            group = spec.group_size or DEFAULT_INT4_GROUP
            for what, size in shape.in_features().items():
                if size % group:
                    raise StageError(
                        f"{stage.field}.groupSize: {group} does not divide the in-features of every "
                        f"linear layer ({what} is {size})"
                    )
    elif isinstance(spec, Pruning):
        if spec.method == PruningMethod.STRUCTURED:
            if shape.model_type not in STRUCTURED_FAMILIES:
                raise StageError(
                    f"{stage.field}.method: Structured pruning supports the {', '.join(STRUCTURED_FAMILIES)} "
                    f"architectures (separate q/k/v/o and gate/up/down projections); this model is "
                    f"{shape.model_type!r}: use Magnitude pruning, quantisation or distillation"
                )
            units, per_unit = head_units(shape)
            if kept(units, spec.sparsity) < 1:
                what = "key/value head groups" if per_unit > 1 else "heads"
                raise StageError(
                    f"{stage.field}.sparsity: removing {spec.sparsity:g} of {units} attention {what} "
                    "would remove every attention head"
                )
            if kept(shape.intermediate_size, spec.sparsity) < 1:
                raise StageError(
                    f"{stage.field}.sparsity: removing {spec.sparsity:g} of {shape.intermediate_size} "
                    "MLP channels would remove every channel"
                )
    else:
        student = student_spec(spec.student, shape)
        if student.num_parameters() >= shape.num_parameters():
            raise StageError(
                f"{stage.field}.student: {student.num_parameters():,} parameters is not smaller than the "
                f"teacher's {shape.num_parameters():,}"
            )


def student_spec(student: TransformerShape, teacher: ModelShape, base: ModelSpec | None = None) -> ModelSpec:
    """The student's full ModelSpec: its shape from the spec, vocabulary/context/tying from the teacher,
    everything else (initialisation) from ``base`` (the job's model spec)."""
    return (base or ModelSpec()).model_copy(
        update=dict(
            hidden_size=student.hidden_size,
            num_layers=student.num_layers,
            num_heads=student.num_heads,
            num_key_value_heads=student.num_key_value_heads,
            intermediate_size=student.intermediate_size,
            vocab_size=teacher.vocab_size,
            context_length=teacher.context_length,
            tie_embeddings=teacher.tie_embeddings,
            pretrained=None,  # the student is built from scratch whatever the teacher was
        )
    )
