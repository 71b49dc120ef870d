"""Pipeline parallel with DeepSpeed's PipelineModule and its 1F1B schedule.

The project's Llama becomes a sequence of layers (embedding, one layer per block, final norm and
head), partitioned into ``parallelism.pipeline`` stages with the blocks spread evenly. Every rank
builds the whole model once from the job's seed, so the weights are exactly those of a data-parallel
run, and keeps only its stage's layers (the others are freed when setup returns). DeepSpeed's
PipelineEngine then runs gradient-accumulation-many micro-batches per step in the 1F1B order: each
stage starts a micro-batch's backward as soon as the last stage has computed its loss, so at most
``stages`` micro-batches' activations are alive at once.

Limits: the project's Llama from scratch only (not a pretrained Hugging Face model), untied
embeddings (the head and the embedding sit on different stages; a TiedLayerSpec is not built), Text
records only (packed records carry per-token positions the layers would have to pass along),
ZeRO 0 or 1 only (DeepSpeed's PipelineEngine asserts ZeRO-2 and 3 are incompatible), no sparsity or
L1/L2 penalty. Checkpoints resume under the same mesh only (PipelineModule's per-layer files; no
conversion to another mesh is built).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmtrain.model.llama import Block, Llama, rotary_tables

BLOCK_PREFIX = "layers."


class EmbeddingStage(nn.Module):
    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed

    def forward(self, idx: Tensor) -> Tensor:
        out: Tensor = self.embed_tokens(idx)
        return out


class BlockStage(nn.Module):
    """One transformer block with its own rotary tables (derived, not saved)."""

    rope_cos: Tensor
    rope_sin: Tensor

    def __init__(self, block: Block, head_dim: int, context: int) -> None:
        super().__init__()
        self.block = block
        cos, sin = rotary_tables(head_dim, context)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        cos, sin = self.rope_cos[:t].to(x.dtype), self.rope_sin[:t].to(x.dtype)
        out: Tensor = self.block(x, cos, sin, None)
        return out


class HeadStage(nn.Module):
    def __init__(self, norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.norm, self.lm_head = norm, head

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.lm_head(self.norm(x))
        return out


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """The Llama's own loss: mean cross entropy over the tokens, in FP32, -100 ignored."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def layers_of(model: Llama) -> list[nn.Module]:
    """The Llama as the layer sequence PipelineModule partitions (the model object itself is not kept)."""
    a = model.args
    return [
        EmbeddingStage(model.embed_tokens),
        *(BlockStage(cast(Block, b), a.head_dim, a.context_length) for b in model.layers),
        HeadStage(model.norm, model.lm_head),
    ]


def build(model: Llama, stages: int) -> Any:
    """A PipelineModule of ``model`` over ``stages`` stages, blocks spread evenly (partition by type)."""
    from deepspeed.pipe import PipelineModule

    return PipelineModule(
        layers=layers_of(model), num_stages=stages, loss_fn=lm_loss, partition_method="type:BlockStage"
    )


def micro_batches(loader: Any, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """The loader as PipelineEngine pulls it: (inputs, labels) per micro-batch. The first stage reads
    the inputs, the last the labels; every stage pulls, so all keep the same data position."""
    while True:
        b = loader.next()
        yield b.inputs.to(device), b.targets.to(device)


def train_step(engine: Any, batches: Iterator[tuple[Tensor, Tensor]]) -> float:
    """One optimiser step: gradient-accumulation-many micro-batches through the 1F1B schedule; the
    mean loss over them, which DeepSpeed broadcasts from the last stage to every stage."""
    return float(engine.train_batch(batches).item())


def evaluate(engine: Any, batches: list[Any]) -> float:
    """Mean validation loss over ``batches`` (every stage calls it; one micro-batch per call)."""
    total = 0.0
    for b in batches:
        data = iter([(b.inputs.to(engine.device), b.targets.to(engine.device))])
        total += float(engine.eval_batch(data, num_micro_batches=1).item())
    return total / len(batches)


def bubble_fraction(stages: int, micro_batches_per_step: int) -> float:
    """The 1F1B schedule's idle share per stage: (p - 1) / (m + p - 1) for p stages, m micro-batches."""
    return (stages - 1) / (micro_batches_per_step + stages - 1)


def llama_state_dict(engine: Any) -> dict[str, Tensor] | None:
    """The whole model's state on rank 0 in the Llama's names (a collective over every rank): each
    stage's layers renamed back from PipelineModule's ``<layer index>.<...>``, gathered to rank 0."""
    import torch.distributed as dist

    module = engine.module
    blocks = module._num_layers - 2  # embedding, blocks, head
    local: dict[str, Tensor] = {}
    for key, value in module.state_dict().items():
        index, _, rest = key.partition(".")
        i = int(index)
        if i == 0:
            name = rest
        elif i == blocks + 1:
            name = rest
        else:
            name = BLOCK_PREFIX + f"{i - 1}." + rest.removeprefix("block.")
        local[name] = value.detach().cpu()
    # Only the data-parallel replica 0 of each stage sends: the other replicas hold the same weights.
    parts: list[dict[str, Tensor] | None] = [None] * dist.get_world_size()
    mine = local if engine.grid.get_data_parallel_id() == 0 else {}
    dist.all_gather_object(parts, mine)
    if dist.get_rank() != 0:
        return None
    merged: dict[str, Tensor] = {}
    for part in parts:
        merged.update(part or {})
    return merged
