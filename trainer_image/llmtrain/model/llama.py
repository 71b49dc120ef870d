"""A readable Llama-style decoder: RMSNorm, rotary positions, SwiGLU, grouped-query attention.

Module and parameter names follow transformers' LlamaForCausalLM exactly (``embed_tokens``,
``layers.N.self_attn.q_proj`` ...), so export is a rename-free copy with a ``model.`` prefix, and the
maths (rotate-half rotary, fp32 RMSNorm) matches it so logits agree to float precision.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llmtrain.model.args import Init, LlamaArgs

ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-5


class _Penalty(torch.autograd.Function):
    """Identity on ``y`` that also returns l1*|w|_1 + l2*|w|^2 and routes its gradient to ``w``.

    The penalty must be computed while the weight is materialised: under ZeRO-3 a parameter only
    holds data inside its module's forward and backward. Tying the penalty's backward to ``y`` (which
    flows through the module's output hooks) makes DeepSpeed gather ``w`` before it is needed, and
    because the penalty value joins the loss it is scaled by accumulation and loss scaling like the loss.
    """

    @staticmethod
    def forward(ctx: Any, y: Tensor, w: Tensor, l1: float, l2: float) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(w)
        ctx.l1, ctx.l2 = l1, l2
        w32 = w.detach().float()
        penalty = l1 * w32.abs().sum() + l2 * w32.pow(2).sum()
        return y.view_as(y), penalty

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, grad_penalty: Tensor) -> tuple[Tensor, Tensor, None, None]:
        (w,) = ctx.saved_tensors
        grad_w = (ctx.l1 * torch.sign(w) + 2 * ctx.l2 * w) * grad_penalty.to(w.dtype)
        return grad_y, grad_w, None, None


class Linear(nn.Linear):
    """Bias-free linear layer with an optional pruning mask and optional L1/L2 penalty.

    The mask is a persistent buffer multiplied in on every forward, so pruned weights are exactly
    zero in every forward, in every checkpoint's effective weights and in the export, whatever ZeRO
    stage holds (and whichever optimiser updates) the underlying parameter.

    An ``nn.Linear`` so that DeepSpeed's AutoTP recognises it and shards it for tensor parallel
    (replacing it with its own column/row-parallel layers, which is why admission refuses pruning and
    L1/L2 penalties with tensor parallel). Weights are set by ``init_weights``, not nn.Linear's init.
    """

    mask: Tensor | None

    def __init__(self, in_features: int, out_features: int, sparse: bool = False) -> None:
        super().__init__(in_features, out_features, bias=False, device="meta")
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("mask", torch.ones(out_features, in_features) if sparse else None)
        self.l1 = 0.0
        self.l2 = 0.0
        self.penalty: Tensor | None = None

    def effective_weight(self) -> Tensor:
        # DeepSpeed casts parameters (not buffers) to bf16/fp16, so match the mask to the weight.
        return self.weight if self.mask is None else self.weight * self.mask.to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        w = self.effective_weight()
        y = F.linear(x, w)
        if self.l1 or self.l2:
            y, self.penalty = _Penalty.apply(y, w, self.l1, self.l2)
        return y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = RMS_NORM_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 (as transformers does) so bf16 training stays stable and export matches.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(head_dim: int, length: int, theta: float = ROPE_THETA) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half rotary embedding (the layout Llama checkpoints use for q_proj/k_proj)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, dropout: float, sparse: bool) -> None:
        super().__init__()
        self.n_heads = args.num_heads
        self.n_kv = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.dropout = dropout
        d = args.hidden_size
        self.q_proj = Linear(d, self.n_heads * self.head_dim, sparse)
        self.k_proj = Linear(d, self.n_kv * self.head_dim, sparse)
        self.v_proj = Linear(d, self.n_kv * self.head_dim, sparse)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, sparse)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallel each rank's projections hold a slice of the heads.
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv != self.n_heads,
        )
        out: Tensor = self.o_proj(y.transpose(1, 2).reshape(b, t, -1))
        return out


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: LlamaArgs, sparse: bool) -> None:
        super().__init__()
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, sparse)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, sparse)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, sparse)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class Block(nn.Module):
    def __init__(self, args: LlamaArgs, dropout: float, sparse: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size)
        self.self_attn = Attention(args, dropout, sparse)
        self.post_attention_layernorm = RMSNorm(args.hidden_size)
        self.mlp = MLP(args, sparse)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        out: Tensor = x + self.drop(self.mlp(self.post_attention_layernorm(x)))
        return out


class Llama(nn.Module):
    """Decoder-only language model.

    ``forward(idx)`` returns ``(logits, 0)``; ``forward(idx, targets)`` returns
    ``(cross_entropy, penalty)`` where penalty is the L1/L2 term (0 when disabled). The training loss is
    their sum; they are kept apart so the logged loss and the validation loss are the pure LM loss.
    Targets of -100 carry no loss. ``positions`` (optional, [B, T]) restart at 0 at every packed
    record: each token then gets its record's rotary position and attends within its record only,
    as transformers does for packed position_ids.
    """

    rope_cos: Tensor
    rope_sin: Tensor

    def __init__(
        self,
        args: LlamaArgs,
        dropout: float = 0.0,
        sparse: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.args = args
        self.activation_checkpointing = activation_checkpointing
        self.penalized = False
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, dropout, sparse) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size)
        # Embeddings are never pruned: a zeroed row would delete a token.
        self.lm_head = Linear(args.hidden_size, args.vocab_size)
        if args.tie_embeddings:
            self.lm_head.weight = cast(nn.Parameter, self.embed_tokens.weight)
        cos, sin = rotary_tables(args.head_dim, args.context_length)
        # Derived from the shape, so not persistent: checkpoints and export stay free of them.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def linears(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]

    def set_penalty(self, l1: float, l2: float) -> None:
        self.penalized = bool(l1 or l2)
        for m in self.linears():
            m.l1, m.l2 = l1, l2

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        t = idx.shape[1]
        x = self.embed_tokens(idx)
        # Tables stay fp32 (buffers are not cast by DeepSpeed); use them in the activations' dtype, as HF does.
        mask: Tensor | None = None
        if positions is None:
            cos, sin = self.rope_cos[:t].to(x.dtype), self.rope_sin[:t].to(x.dtype)
        else:
            cos = self.rope_cos[positions].unsqueeze(1).to(x.dtype)  # [B, 1, T, D]: per-token positions
            sin = self.rope_sin[positions].unsqueeze(1).to(x.dtype)
            mask = packed_causal_mask(positions)
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask)
        logits = self.lm_head(self.norm(x))
        penalty = self._collect_penalty(logits)
        if targets is None:
            return logits, penalty
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return loss, penalty

    def _collect_penalty(self, like: Tensor) -> Tensor:
        total = torch.zeros((), device=like.device, dtype=torch.float32)
        if not self.penalized:
            return total
        for m in self.linears():
            if m.penalty is not None:
                total = total + m.penalty
                m.penalty = None  # drop the graph reference as soon as it is summed
        return total


def packed_causal_mask(positions: Tensor) -> Tensor:
    """[B, 1, T, T] boolean: causal, and only within a record (a record starts where positions do not
    go up by one; transformers' find_packed_sequence_indices rule)."""
    first = positions[:, :1] - 1
    record = (torch.diff(positions, prepend=first, dim=-1) != 1).cumsum(-1)
    t = positions.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=positions.device).tril()
    same = record.unsqueeze(-1) == record.unsqueeze(-2)
    return (same & causal).unsqueeze(1)


@torch.no_grad()
def init_weights(model: Llama, args: LlamaArgs, seed: int) -> None:
    """Initialise every weight from ``seed`` per args.init (norm gains start at one)."""
    gen = torch.Generator().manual_seed(seed)
    scheme, std = args.init, args.init_std
    residual_std = std / math.sqrt(2 * args.num_layers)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.fill_(1.0)
        elif scheme == Init.NORMAL or name == "embed_tokens.weight":
            # GPT-2/Llama practice: projections that write into the residual stream start smaller
            # so the stream's variance does not grow with depth.
            s = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            p.normal_(0.0, s, generator=gen)
        elif scheme == Init.XAVIER:
            nn.init.xavier_uniform_(p, generator=gen)
        else:
            nn.init.kaiming_normal_(p, nonlinearity="relu", generator=gen)


def build_model(
    args: LlamaArgs,
    seed: int,
    dropout: float = 0.0,
    sparse: bool = False,
    activation_checkpointing: bool = False,
) -> Llama:
    model = Llama(args, dropout=dropout, sparse=sparse, activation_checkpointing=activation_checkpointing)
    init_weights(model, args, seed)
    return model
