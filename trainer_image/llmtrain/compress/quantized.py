"""Quantised replacements for ``nn.Linear`` and ``nn.Embedding`` that run on PyTorch's own CPU kernels.

Each module keeps its weights in a plain, portable on-disk form (the persistent buffers, saved with
safetensors) and, where a fast kernel exists for the shape, a kernel-specific copy built at load time.

* int8, symmetric, one scale per output row: ``w = q * scale``. The scale is rounded to a bf16 value
  (kept in fp32) because the weight-only kernel takes bf16 scales; rounding it before choosing ``q``
  makes every path (kernel, fallback, embedding lookup) see exactly the same weights.
* int4, asymmetric, one scale and zero per ``group_size`` input columns (tinygemm's convention):
  ``w = (q - 8) * scale + zero``, ``q`` in 0..15, two per byte (low nibble = even column).

Kernels (measured on this repository's AVX-512 CPU, see docs/compression.md): ``_weight_int8pack_mm``
and ``_weight_int4pack_mm_for_cpu`` are fast only with bf16 activations, so weight-only layers cast the
activations to bf16 around the kernel; ``_int_mm`` (int8 x int8 -> int32, VNNI) serves the dynamic mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INT4_KERNEL_GROUPS = (32, 64, 128, 256)


def aligned(t: Tensor) -> Tensor:
    """``t`` contiguous at a 64-byte boundary (a copy if needed).

    The AVX-512 int8 kernel reads activations and weights with *aligned* vector loads; tensors
    memory-mapped from a safetensors file or views into a larger tensor can start anywhere, and an
    unaligned pointer crashes the process with SIGSEGV rather than raising.
    """
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.contiguous().clone()


def _bf16_input(x: Tensor, in_features: int) -> Tensor:
    return aligned(x.reshape(-1, in_features).to(torch.bfloat16))


def _bf16_exact(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


def quantize_int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: returns (q int8 [N, K], scale fp32 [N])."""
    w = weight.detach().float()
    scale = _bf16_exact(w.abs().amax(dim=1).clamp(min=1e-12) / 127.0)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_int4_groups(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group-wise int4: returns (packed uint8 [N, K/2], scale bf16 [N, G], zero bf16 [N, G])."""
    w = weight.detach().float()
    n, k = w.shape
    if k % group_size or k % 2:
        raise ValueError(f"in-features {k} is not a multiple of the int4 group size {group_size}")
    groups = w.reshape(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low).clamp(min=1e-8) / 15.0).to(torch.bfloat16)
    zero = (low + 8 * scale.float()).to(torch.bfloat16)
    # Quantise against the bf16 scale/zero actually stored, so rounding is to the real grid.
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    q = q.to(torch.uint8).reshape(n, k)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    return packed, scale.contiguous(), zero.contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [N, K/2] (low nibble first) -> int32 [N, K] in 0..15."""
    low = (packed & 0x0F).to(torch.int32)
    high = (packed >> 4).to(torch.int32)
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


class QuantizedLinear(nn.Module):
    """Common interface: linear with quantised weight and an optional float bias (Qwen2's q/k/v and
    GPT-2's projections have one); ``dequantized_weight`` for analysis."""

    in_features: int
    out_features: int
    qweight: Tensor
    bias: Tensor | None

    def _set_bias(self, bias: Tensor | None) -> None:
        if bias is None:
            self.bias = None
        else:
            self.register_buffer("bias", bias.detach().clone())

    def _add_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self) -> Tensor:
        raise NotImplementedError


class Int8WeightOnlyLinear(QuantizedLinear):
    """int8 weights, float activations (bf16 inside the kernel). 4x smaller than fp32."""

    qweight: Tensor
    scale: Tensor

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", aligned(qweight))
        self.register_buffer("scale", scale)
        self._set_bias(bias)
        # The AVX-512 kernel steps through K 16 values at a time with no tail: any other K would read
        # past the row (wrong sums, or SIGSEGV past the buffer's end).
        self.use_kernel = self.in_features % 16 == 0
        self._scale_bf16 = scale.to(torch.bfloat16)

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None) -> Int8WeightOnlyLinear:
        return cls(*quantize_int8_rows(weight), bias=bias)

    def dequantized_weight(self) -> Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        if not self.use_kernel or x.device.type != "cpu":
            return self._add_bias(F.linear(x, self.dequantized_weight().to(x.dtype)))
        x2 = _bf16_input(x, self.in_features)
        y: Tensor = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self._scale_bf16)
        return self._add_bias(y.to(x.dtype).reshape(*x.shape[:-1], self.out_features))


class Int8DynamicLinear(QuantizedLinear):
    """int8 weights and int8 activations (per-token scale chosen at run time), int32 accumulation."""

    qweight: Tensor
    scale: Tensor

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", aligned(qweight))
        self.register_buffer("scale", scale)
        self._set_bias(bias)

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None) -> Int8DynamicLinear:
        return cls(*quantize_int8_rows(weight), bias=bias)

    def dequantized_weight(self) -> Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        x_scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        xq = torch.round(x2 / x_scale).clamp(-127, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.qweight.t())
        y = acc.float() * x_scale * self.scale
        return self._add_bias(y.to(x.dtype).reshape(*x.shape[:-1], self.out_features))


class Int4WeightOnlyLinear(QuantizedLinear):
    """Group-wise int4 weights, float activations (bf16 inside the kernel). ~7x smaller than fp32."""

    qweight: Tensor
    scale: Tensor
    zero: Tensor

    def __init__(self, qweight: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * 2
        self.group_size = self.in_features // scale.shape[1]
        self.register_buffer("qweight", aligned(qweight))
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self._set_bias(bias)
        # The CPU tinygemm kernel needs N % 16 == 0 and one of its group sizes; else dequantise.
        self.use_kernel = self.out_features % 16 == 0 and self.group_size in INT4_KERNEL_GROUPS
        self._packed: Tensor | None = None
        self._scales_and_zeros: Tensor | None = None
        if self.use_kernel:
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(qweight), 8)
            self._scales_and_zeros = torch.stack((scale.t(), zero.t()), dim=-1).contiguous()

    @classmethod
    def from_float(cls, weight: Tensor, group_size: int, bias: Tensor | None = None) -> Int4WeightOnlyLinear:
        return cls(*quantize_int4_groups(weight, group_size), bias=bias)

    def dequantized_weight(self) -> Tensor:
        q = unpack_int4(self.qweight).float().reshape(self.out_features, -1, self.group_size)
        w = (q - 8) * self.scale.float()[..., None] + self.zero.float()[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if self._packed is None or x.device.type != "cpu":
            return self._add_bias(F.linear(x, self.dequantized_weight().to(x.dtype)))
        x2 = _bf16_input(x, self.in_features)
        y: Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self._packed, self.group_size, self._scales_and_zeros
        )
        return self._add_bias(y.to(x.dtype).reshape(*x.shape[:-1], self.out_features))


class Int8Embedding(nn.Module):
    """Token embedding with int8 rows (one scale per token); shares its tensors with a tied int8 head."""

    qweight: Tensor
    scale: Tensor

    def __init__(self, qweight: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", aligned(qweight))
        self.register_buffer("scale", scale)
        self.dtype = dtype

    @classmethod
    def from_float(cls, weight: Tensor) -> Int8Embedding:
        return cls(*quantize_int8_rows(weight), dtype=weight.dtype)

    def dequantized_weight(self) -> Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.qweight).float() * self.scale[ids].unsqueeze(-1)
        return rows.to(self.dtype)
