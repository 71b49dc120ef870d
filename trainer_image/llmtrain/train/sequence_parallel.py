"""Ulysses sequence parallel (DeepSpeed's ``DistributedAttention``) for the project's Llama.

Each rank of a sequence group holds 1/sp of every sequence's tokens. Everything outside attention is
per-token, so it runs on the slice unchanged; attention needs the whole sequence, so DeepSpeed's
all-to-all trades the sequence split for a head split (each rank attends over all T tokens for H/sp
heads) and trades back after. Parameters are not partitioned: every rank holds the full model, so
ZeRO checkpoints are ordinary data-parallel ones over the sequence-data-parallel group.

Gradients: DeepSpeed all-reduces over the sequence-data-parallel group and divides by
``seq_dp_world / sp`` (``stage_1_and_2.py``, ``engine._reduce_non_expert_gradients``), i.e. it SUMS
over the sequence ranks and averages over replicas. The loss each rank backpropagates must then be its
share of the full-sequence mean: with equal slices, ``local mean / sp`` (see ``scale_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from llmtrain.model.llama import Attention, Llama


@dataclass
class SequenceGroups:
    """The ``mpu`` deepspeed.initialize takes: DeepSpeed reads the sequence, sequence-data and data
    groups from it (``deepspeed.utils.groups._get_sequence_*``). Ranks are laid out (data, sequence)
    row-major: ranks s*r .. s*r+s-1 form sequence group r, so a group stays on one pod when sp divides
    procsPerNode."""

    sp: int
    sp_group: Any
    dp_group: Any
    world_group: Any
    mp_group: Any

    @classmethod
    def build(cls, sp: int) -> SequenceGroups:
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % sp:
            raise ValueError(f"WORLD_SIZE={world} is not a multiple of sequence={sp}")
        sp_group = dp_group = mp_group = None
        # Every rank must take part in every new_group call, in the same order.
        for r in range(world // sp):
            g = dist.new_group(list(range(r * sp, (r + 1) * sp)))
            if rank // sp == r:
                sp_group = g
        for s in range(sp):
            g = dist.new_group(list(range(s, world, sp)))
            if rank % sp == s:
                dp_group = g
        for r in range(world):
            g = dist.new_group([r])
            if r == rank:
                mp_group = g
        return cls(sp, sp_group, dp_group, dist.new_group(list(range(world))), mp_group)

    def get_sequence_parallel_group(self) -> Any:
        return self.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.sp

    def get_sequence_parallel_rank(self) -> int:
        return dist.get_rank() % self.sp

    def get_sequence_data_parallel_group(self) -> Any:
        return self.world_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return dist.get_world_size()

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank()

    def get_data_parallel_group(self) -> Any:
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size() // self.sp

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank() // self.sp

    def get_model_parallel_group(self) -> Any:
        return self.mp_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def _core(q: Tensor, k: Tensor, v: Tensor, dropout: float, gqa: bool) -> Tensor:
    # DistributedAttention hands [B, T, H/sp, D]; SDPA wants [B, H, T, D].
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        dropout_p=dropout,
        enable_gqa=gqa,
    )
    return y.transpose(1, 2)


class _Core(nn.Module):
    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.dropout = attn.dropout
        self.gqa = attn.n_kv != attn.n_heads

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _core(q, k, v, self.dropout if self.training else 0.0, self.gqa)


class _UlyssesForward:
    """Attention.forward on this rank's slice: projections and rotary on T/sp tokens, the core over
    all T through DistributedAttention. Rotary tables come from the model, offset by the slice's start,
    so each token's cos/sin are those of its absolute position in the full sequence."""

    def __init__(self, attn: Attention, model: Llama, groups: SequenceGroups) -> None:
        from deepspeed.sequence.layer import DistributedAttention

        self.attn = attn
        self.rank = groups.get_sequence_parallel_rank()
        self.rope_cos: Tensor = model.rope_cos
        self.rope_sin: Tensor = model.rope_sin
        # [B, T/sp, H, D] in: scatter the heads (dim 2), gather the sequence (dim 1), batch first (0).
        self.ulysses = DistributedAttention(_Core(attn), groups.sp_group, scatter_idx=2, gather_idx=1)

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        from llmtrain.model.llama import apply_rotary

        if mask is not None:
            raise ValueError("sequence parallel runs causal attention over Text windows only")
        a = self.attn
        b, t, _ = x.shape
        start = self.rank * t
        c = self.rope_cos[start : start + t].to(x.dtype)
        s = self.rope_sin[start : start + t].to(x.dtype)
        q = a.q_proj(x).view(b, t, -1, a.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(b, t, -1, a.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(b, t, -1, a.head_dim)
        q, k = apply_rotary(q, c, s).transpose(1, 2), apply_rotary(k, c, s).transpose(1, 2)
        y: Tensor = self.ulysses(q.contiguous(), k.contiguous(), v.contiguous(), 0)
        out: Tensor = a.o_proj(y.reshape(b, t, -1))
        return out


def wrap(model: Llama, groups: SequenceGroups) -> Llama:
    """Replace each Block's attention forward with the Ulysses one (parameters untouched)."""
    if model.args.num_key_value_heads % groups.sp:
        raise ValueError(
            f"key/value heads {model.args.num_key_value_heads} do not divide sequence={groups.sp}"
        )
    for block in model.layers:
        attn = cast("Attention", block.self_attn)
        ulysses = _UlyssesForward(attn, model, groups)
        attn.add_module("ulysses", ulysses.ulysses)  # the core's dropout follows train()/eval()
        attn.forward = ulysses  # type: ignore[method-assign]
    return model


def local(batch: Tensor, groups: SequenceGroups) -> Tensor:
    """This rank's contiguous slice of every sequence ([B, T] -> [B, T/sp])."""
    t = batch.shape[1]
    if t % groups.sp:
        raise ValueError(f"sequence length {t} does not divide by sequence={groups.sp}")
    n = t // groups.sp
    r = groups.get_sequence_parallel_rank()
    return batch[:, r * n : (r + 1) * n]


def scale_loss(loss: Tensor, groups: SequenceGroups) -> Tensor:
    """The slice mean as its share of the full-sequence mean: DeepSpeed sums gradients over the
    sequence ranks, so each backpropagates mean/sp (equal slices: Text windows have no -100 targets)."""
    return loss / groups.sp


def full_loss(loss: Tensor, groups: SequenceGroups) -> Tensor:
    """The full-sequence mean for logging (no gradient)."""
    out = loss.detach().clone()
    dist.all_reduce(out, group=groups.sp_group)
    return out / groups.sp


__all__ = ["SequenceGroups", "full_loss", "local", "scale_loss", "wrap"]
