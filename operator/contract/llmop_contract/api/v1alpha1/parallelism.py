"""How one model replica is split over processes: tensor, pipeline and sequence parallel.

Data parallel (ZeRO) takes what is left: the world of numNodes x procsPerNode processes holds
worldSize / (tensor x pipeline x sequence) model replicas, and every process of one replica sees the
same batch. The cross-field rules (world, heads, layers, ZeRO stage) are on the job's spec, where
the workers and the model are.
"""

from __future__ import annotations

from pydantic import Field

from llmop_contract.api.base import ApiModel


class ParallelismSpec(ApiModel):
    """Model parallel sizes; 1 everywhere (the default) is pure data parallel."""

    tensor: int = Field(1, ge=1, le=64)
    """Tensor parallel size (DeepSpeed AutoTP): each block's matrices split over this many processes of one node."""
    pipeline: int = Field(1, ge=1, le=64)
    """Pipeline parallel size (DeepSpeed PipelineModule, 1F1B): stages the layers are split into."""
    sequence: int = Field(1, ge=1, le=64)
    """Sequence parallel size (DeepSpeed Ulysses): slices each sequence is split into."""

    @property
    def model_parallel(self) -> int:
        """Processes holding one model replica."""
        return self.tensor * self.pipeline * self.sequence

    @property
    def enabled(self) -> bool:
        return self.model_parallel > 1

    def data_parallel(self, world: int) -> int:
        """Model replicas in a world of ``world`` processes (admission makes it divide)."""
        return world // self.model_parallel
