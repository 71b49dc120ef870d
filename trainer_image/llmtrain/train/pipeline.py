"""Pipeline parallel with DeepSpeed's PipelineModule and its 1F1B schedule.

The project's Llama becomes a sequence of layers (embedding, one layer per block, final norm and
head), partitioned into ``parallelism.pipeline`` stages with the blocks spread evenly. Every rank
builds the whole model once from the job's seed, so the weights are exactly those of a data-parallel
run, and keeps only its stage's layers (the others are freed when setup returns). DeepSpeed's
PipelineEngine then runs gradient-accumulation-many micro-batches per step in the 1F1B order: each
stage starts a micro-batch's backward as soon as the last stage has computed its loss, so at most
``stages`` micro-batches' activations are alive at once.

With parallelism.tensor > 1 too, each stage is sharded by DeepSpeed's AutoTP over a tensor group of
consecutive ranks: one (pipe, data, model) topology, DeepSpeed's PipeModelDataParallelTopology,
row-major with the model (tensor) axis innermost, so rank = (stage x replicas + replica) x tensor +
tensor rank. Its tensor groups are the consecutive-rank groups AutoTP expects; its data-parallel
groups join the same stage and tensor rank of every replica; its model-parallel group, the one
ZeRO sums the gradient norm over, is a whole replica (every stage, every shard). See
``adopt_tensor_parallel`` for how AutoTP is made to use them.

Limits: the project's Llama from scratch only (not a pretrained Hugging Face model), untied
embeddings (the head and the embedding sit on different stages; a TiedLayerSpec is not built), Text
records only (packed records carry per-token positions the layers would have to pass along),
ZeRO 0 or 1 only (DeepSpeed's PipelineEngine asserts ZeRO-2 and 3 are incompatible), no sparsity or
L1/L2 penalty. Checkpoints resume under the same mesh (PipelineModule's per-layer files; under
tensor x pipeline one per layer and tensor rank, ``layer_<i>-model_<t>``), and at ZeRO-1 a pipeline
checkpoint resumes under another pipeline size or data parallel through DeepSpeed's universal
checkpoint, its parameters renamed between the stages' names and the Llama's
(``universal_renames``, checkpoint.to_universal). Tensor x pipeline checkpoints resume under the
same mesh only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.distributed as dist
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


def adopt_tensor_parallel(module: Any, tensor: int) -> None:
    """Put ``module`` (a PipelineModule, before deepspeed.initialize) on a (pipe, data, model) topology
    of ``tensor``-wide tensor groups, and make AutoTP shard over those groups.

    The trainer builds the PipelineModule from the stage count alone (a (pipe, data) topology); the
    stage of each rank is the same in both (pipe is the outer axis), so only the grid is replaced.
    AutoTP's set-up (DeepSpeedEngine._configure_tensor_parallel_states) calls
    ``groups._init_tp_mesh_device``, which builds a (data, tensor) mesh over the whole world unless a
    tensor group exists: its tensor groups would be right, but its data-parallel groups would join
    the two stages (ranks 0 and 2 of tensor=2 x pipeline=2), and the engine would broadcast and
    average stage 0's weights with stage 1's. So the topology's groups are installed first; the
    model-parallel one is the whole replica, so ZeRO's gradient norm (clipping) sums every stage's
    and every shard's gradients, as pure pipeline's grid does.
    """
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology
    from deepspeed.utils import groups

    stages, world = int(module.num_stages), dist.get_world_size()
    topology = PipeModelDataParallelTopology(num_pp=stages, num_mp=tensor, num_dp=world // (stages * tensor))
    if topology.get_coord(dist.get_rank()).pipe != module.stage_id:
        raise RuntimeError(f"rank {dist.get_rank()} would change stage under tensor={tensor}")
    grid = PipelineParallelGrid(process_group=module.world_group, topology=topology)
    module._topo, module._grid = topology, grid
    groups._TENSOR_MODEL_PARALLEL_GROUP = grid.get_slice_parallel_group()
    groups._DATA_PARALLEL_GROUP = grid.get_data_parallel_group()
    groups._MODEL_PARALLEL_GROUP = grid.get_model_parallel_group()


class TensorPipeGroups:
    """The mpu of a PipelineEngine under AutoTP: the PipelineModule's grid, which also answers the
    tensor-group queries.

    AutoTP's set-up replaces the engine's mpu (the grid) by ``deepspeed.utils.groups``, which has no
    pipe-parallel group for the PipelineEngine's loss broadcast (``_aggregate_total_loss``); the
    grid lacks the tensor group and source rank AutoTP's first-batch check asks for. After
    ``adopt_tensor_parallel`` both name the same groups, so this serves both.
    """

    def __init__(self, grid: Any) -> None:
        self.grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def get_tensor_model_parallel_group(self) -> Any:
        return self.grid.get_slice_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return int(self.grid.slice_group[0])


def attach_tensor_parallel(engine: Any) -> None:
    """Point a PipelineEngine that AutoTP set up (after deepspeed.initialize) back at its grid.

    AutoTP left the engine's mpu at ``deepspeed.utils.groups`` (see ``TensorPipeGroups``) and took
    the checkpoint's model-parallel rank from it: the tensor rank, the same on every stage, so stage 1
    would overwrite stage 0's ``mp_rank_*_model_states.pt`` and ZeRO optimiser shards. The grid's
    model-parallel rank is this rank's place in its replica (stage x tensor + tensor rank), which
    names one file per stage and shard, as the stage index does under pipeline parallel alone.
    """
    grid = engine.grid
    engine.mpu = TensorPipeGroups(grid)
    engine.mp_world_size = grid.get_model_parallel_world_size()
    engine.checkpoint_mp_rank = grid.get_model_parallel_rank()


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
    stage's layers renamed back from PipelineModule's ``<layer index>.<...>``, gathered to rank 0.
    Under tensor parallel each stage's AutoTP shards are first gathered whole within its tensor
    group (DeepSpeed's GatherReplacedLayerParams, layer by layer)."""
    module = engine.module
    blocks = module._num_layers - 2  # embedding, blocks, head
    local: dict[str, Tensor] = {}
    for key, value in _whole_stage_state(module).items():
        index, _, rest = key.partition(".")
        i = int(index)
        if i == 0:
            name = rest
        elif i == blocks + 1:
            name = rest
        else:
            name = BLOCK_PREFIX + f"{i - 1}." + rest.removeprefix("block.")
        local[name] = value.detach().cpu()
    # Only tensor rank 0 of replica 0 of each stage sends: the others hold the same (gathered) weights.
    parts: list[dict[str, Tensor] | None] = [None] * dist.get_world_size()
    grid = engine.grid
    mine = local if grid.get_data_parallel_id() == 0 and grid.get_slice_parallel_rank() == 0 else {}
    dist.all_gather_object(parts, mine)
    if dist.get_rank() != 0:
        return None
    merged: dict[str, Tensor] = {}
    for part in parts:
        merged.update(part or {})
    return merged


def _whole_stage_state(module: nn.Module) -> dict[str, Tensor]:
    """This stage's state dict, AutoTP's sharded weights gathered whole (a collective over the tensor
    group; without AutoTP, the state dict as it is)."""
    from deepspeed.module_inject.layers import GatherReplacedLayerParams

    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    for prefix, sub in module.named_modules():
        own = list(sub.parameters(recurse=False))
        with GatherReplacedLayerParams(own, sub, enabled=bool(own)):
            for name, param in sub.named_parameters(recurse=False):
                state[f"{prefix}.{name}" if prefix else name] = param.detach().cpu().clone()
    return state


EMBEDDING_NAMES = ("embed_tokens.",)
HEAD_NAMES = ("norm.", "lm_head.")


def universal_renames(names: list[str], to_pipeline: bool) -> dict[str, str]:
    """Old name -> new name for every parameter of a universal checkpoint (one folder per parameter,
    named as the engine that wrote it names its parameters), between the Llama's names (data parallel)
    and PipelineModule's ``<layer index>.<...>`` (the layers of ``layers_of``: 0 the embedding, 1..n
    the blocks as ``<i>.block.``, n + 1 the norm and head), the mapping ``llama_state_dict`` applies.

    The layer index is global (the same at every stage count), so only a change to or from pipeline
    parallel renames. The block count comes from the names themselves; a name of neither layout
    raises ValueError rather than leave a parameter unloaded or loaded into another's place."""
    renames: dict[str, str] = {}
    if to_pipeline:
        blocks = 1 + max((int(n.split(".")[1]) for n in names if n.startswith(BLOCK_PREFIX)), default=-1)
        for name in names:
            if name.startswith(BLOCK_PREFIX):
                index, _, rest = name.removeprefix(BLOCK_PREFIX).partition(".")
                renames[name] = f"{int(index) + 1}.block.{rest}"
            elif name.startswith(EMBEDDING_NAMES):
                renames[name] = f"0.{name}"
            elif name.startswith(HEAD_NAMES):
                renames[name] = f"{blocks + 1}.{name}"
            else:
                raise ValueError(f"parameter {name!r} is not one of the Llama's layers")
        return renames
    indices = [int(n.partition(".")[0]) for n in names if n.partition(".")[0].isdigit()]
    head = max(indices, default=0)
    for name in names:
        index, _, rest = name.partition(".")
        if not index.isdigit():
            raise ValueError(f"parameter {name!r} is not named by a pipeline layer index")
        i = int(index)
        if (i == 0 and rest.startswith(EMBEDDING_NAMES)) or (i == head and rest.startswith(HEAD_NAMES)):
            renames[name] = rest
        elif 0 < i < head and rest.startswith("block."):
            renames[name] = f"{BLOCK_PREFIX}{i - 1}.{rest.removeprefix('block.')}"
        else:
            raise ValueError(f"parameter {name!r} is not one of the pipeline's layers")
    return renames
