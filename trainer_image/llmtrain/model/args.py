"""The model's own arguments: everything ``Llama`` and its export need, and nothing of the CRD.

``llmtrain.adapt.llama_args`` builds them from the job's ModelSpec, so a rename in the API reaches
that adapter and not the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Init(StrEnum):
    NORMAL = "Normal"
    """Normal(0, std), residual projections scaled by 1/sqrt(2*num_layers)."""
    XAVIER = "Xavier"
    """Glorot uniform."""
    HE = "He"
    """Kaiming normal."""


@dataclass(frozen=True)
class LlamaArgs:
    """Shape and initialisation of a Llama-style decoder."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_key_value_heads: int
    """Equal to num_heads for multi-head attention; fewer for grouped-query attention."""
    intermediate_size: int
    context_length: int
    """Longest sequence the model supports (rotary table size)."""
    tie_embeddings: bool = True
    init: Init = Init.NORMAL
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_parameters(self) -> int:
        """Parameter count, embeddings counted once when tied."""
        attn = 2 * self.hidden_size**2 + 2 * self.hidden_size * self.num_key_value_heads * self.head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size
        block = attn + mlp + 2 * self.hidden_size
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return self.num_layers * block + emb + self.hidden_size
