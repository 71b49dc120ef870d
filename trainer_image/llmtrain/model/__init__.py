"""The decoder-only transformer trained by llmtrain."""

from llmtrain.model.args import Init, LlamaArgs
from llmtrain.model.llama import Llama, build_model

__all__ = ["Init", "Llama", "LlamaArgs", "build_model"]
