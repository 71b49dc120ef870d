"""The decoder-only transformer trained by llmtrain."""

from llmtrain.model.llama import Llama, build_model

__all__ = ["Llama", "build_model"]
