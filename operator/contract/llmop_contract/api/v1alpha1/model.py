"""The network being trained: a decoder-only transformer described by its shape."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from llmop_contract.api.base import ApiModel, Rule


class Architecture(StrEnum):
    LLAMA = "Llama"


class InitScheme(StrEnum):
    NORMAL = "Normal"
    XAVIER = "Xavier"
    HE = "He"


class Initialization(ApiModel):
    """How weights are initialised before the first step (ignored when resuming)."""

    scheme: InitScheme = InitScheme.NORMAL
    """Normal (std below, residual projections scaled by 1/sqrt(2*numLayers)), Xavier (Glorot uniform) or He (Kaiming normal)."""
    std: float = Field(0.02, gt=0, le=1)
    """Standard deviation for the Normal scheme."""


class TransformerShape(ApiModel):
    """Width and depth of a decoder-only transformer."""

    rules = (
        Rule(
            "self.hiddenSize % self.numHeads == 0",
            lambda m: m.hidden_size % m.num_heads == 0,
            "hiddenSize must be divisible by numHeads",
            ".hiddenSize",
        ),
        Rule(
            "!has(self.numKeyValueHeads) || self.numHeads % self.numKeyValueHeads == 0",
            lambda m: not m.num_key_value_heads or m.num_heads % m.num_key_value_heads == 0,
            "numHeads must be divisible by numKeyValueHeads",
            ".numKeyValueHeads",
        ),
        Rule(
            # Rotary positions rotate pairs of dimensions; the guard leaves a width that heads do
            # not divide to the first rule.
            "self.hiddenSize % self.numHeads != 0 || (self.hiddenSize / self.numHeads) % 2 == 0",
            lambda m: m.hidden_size % m.num_heads != 0 or (m.hidden_size // m.num_heads) % 2 == 0,
            "hiddenSize / numHeads (the head dimension) must be even: rotary positions rotate pairs of dimensions",
            ".hiddenSize",
        ),
    )

    hidden_size: int = Field(256, ge=16, le=32768)
    """Model width (embedding dimension)."""
    num_layers: int = Field(4, ge=1, le=256)
    """Number of transformer blocks."""
    num_heads: int = Field(4, ge=1, le=256)
    """Attention heads per block."""
    num_key_value_heads: int | None = Field(None, ge=1, le=256)
    """Key/value heads for grouped-query attention; unset means equal to numHeads."""
    intermediate_size: int = Field(688, ge=16, le=131072)
    """Hidden width of the SwiGLU feed-forward block."""


class ModelSpec(TransformerShape):
    """The model to train, built from scratch by the trainer."""

    architecture: Architecture = Architecture.LLAMA
    """Block layout; Llama (RMSNorm, rotary positions, SwiGLU) exports as LlamaForCausalLM."""
    vocab_size: int = Field(8192, ge=258, le=262144)
    """Vocabulary size; a tokenizer trained by the data stage gets exactly this many tokens (at least the 256 bytes plus end-of-text and padding)."""
    context_length: int = Field(256, ge=16, le=131072)
    """Longest sequence the model supports (rotary table size)."""
    initialization: Initialization = Field(default_factory=Initialization)
    """Weight initialisation."""
    tie_embeddings: bool = True
    """Share the input embedding and output projection weights."""

    def num_parameters(self) -> int:
        """Parameter count, embeddings counted once when tied."""
        kv = self.num_key_value_heads or self.num_heads
        head_dim = self.hidden_size // self.num_heads
        attn = 2 * self.hidden_size**2 + 2 * self.hidden_size * kv * head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size
        block = attn + mlp + 2 * self.hidden_size
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return self.num_layers * block + emb + self.hidden_size
