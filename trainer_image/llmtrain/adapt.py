"""The one place that turns the CRD's types into the trainer components' own small config types.

Components (the model, export, metrics) take these types, never the API models, so an API rename
or restructuring is an edit here and nowhere else.
"""

from __future__ import annotations

from llmop_contract.api.v1alpha1.model import ModelSpec, ScratchModel
from llmtrain.model.args import Init, LlamaArgs


def llama_args(spec: ModelSpec | ScratchModel) -> LlamaArgs:
    """The model arguments of ``spec`` (numKeyValueHeads defaulted to numHeads)."""
    spec = spec.scratch() if isinstance(spec, ModelSpec) else spec
    return LlamaArgs(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_key_value_heads=spec.num_key_value_heads or spec.num_heads,
        intermediate_size=spec.intermediate_size,
        context_length=spec.context_length,
        tie_embeddings=spec.tie_embeddings,
        init=Init(spec.initialization.scheme.value),
        init_std=spec.initialization.std,
    )
