"""A pretrained Hugging Face causal LM in the trainer: loaded under DeepSpeed, optionally with adapters.

``load`` resolves ``spec.model.pretrained`` to a local directory (llmtrain.sources) and calls
``AutoModelForCausalLM.from_pretrained`` in the training precision. At ZeRO-3 a live
``HfDeepSpeedConfig`` makes transformers build the model inside ``deepspeed.zero.Init`` and copy the
checkpoint in one module at a time, so no rank ever holds the whole model. LoRA wraps it with peft
(only the adapters require gradients, so only they reach the optimiser); QLoRA loads the base in
4-bit NF4 through bitsandbytes first, which needs CUDA.

``CausalLM`` gives the model the call the training loop makes of every model:
``forward(inputs, targets, positions)`` -> ``(loss, penalty)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.api.v1alpha1.training import LoRA, Method, Precision
from llmtrain.config import ConfigError, DataError

IGNORE = -100
"""Target id without loss (torch's ignore_index, Hugging Face's label convention)."""

DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16, Precision.FP32: torch.float32}
METHOD_FIELD = "spec.training.method"
TARGETS_FIELD = "spec.training.lora.targetModules"


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the targets that carry loss (in fp32, as the scratch model).

    Summed and divided by the count rather than ``reduction="mean"``, so a micro-batch that is all
    prompt (every target IGNORE) adds 0 instead of NaN.
    """
    flat = targets.reshape(-1)
    total = F.cross_entropy(
        logits.float().view(-1, logits.size(-1)), flat, ignore_index=IGNORE, reduction="sum"
    )
    return total / (flat != IGNORE).sum().clamp(min=1)


class CausalLM(nn.Module):
    """A transformers (or peft) causal LM behind the loop's call.

    ``forward(inputs)`` returns ``(logits, 0)``; with ``targets`` ``(loss, 0)``: no L1/L2 penalty, which
    admission refuses with a pretrained model. ``positions`` go in as ``position_ids``: restarting at 0
    per packed record, transformers (masking_utils.find_packed_sequence_indices) turns them into
    per-record attention as well as per-record positions.
    """

    model: Any  # a transformers PreTrainedModel or a peft PeftModel (both untyped for mypy)
    memory_before_load: HostMemory | None = None
    """Host memory once the libraries were imported, before from_pretrained (set by ``load``)."""
    memory_loaded: HostMemory | None = None
    """Host memory after from_pretrained: ``peak`` is the high-water mark loading reached."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, inputs: Tensor, targets: Tensor | None = None, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        out = self.model(input_ids=inputs, position_ids=positions, use_cache=False)
        logits: Tensor = out.logits
        penalty = torch.zeros((), device=logits.device, dtype=torch.float32)
        if targets is None:
            return logits, penalty
        return lm_loss(logits, targets), penalty


@dataclass(frozen=True)
class Architecture:
    """What FLOPs and the start-up log need, read from the loaded model and its config."""

    family: str
    """config.model_type, e.g. "llama", "gpt2"."""
    parameters: int
    """All parameters, tied ones once (the whole model even where ZeRO-3 holds a part per rank)."""
    trainable: int
    """Parameters the optimiser updates (all for Full, the adapters for LoRA)."""
    layers: int
    hidden: int
    heads: int
    head_dim: int
    vocab: int
    intermediate: int | None


def _numel(p: Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 leaves an empty placeholder on the module


def architecture(model: Any) -> Architecture:
    config = model.config.get_text_config()
    seen: dict[int, Tensor] = {id(p): p for p in model.parameters()}
    params = list(seen.values())
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return Architecture(
        family=str(config.model_type),
        parameters=sum(_numel(p) for p in params),
        trainable=sum(_numel(p) for p in params if p.requires_grad),
        layers=int(config.num_hidden_layers),
        hidden=hidden,
        heads=heads,
        head_dim=int(head_dim),
        vocab=int(config.vocab_size),
        intermediate=int(inter) if inter else (4 * hidden if config.model_type == "gpt2" else None),
    )


@contextlib.contextmanager
def zero3_init_off() -> Iterator[None]:
    """transformers and peft without the ZeRO-3 hooks: for rank 0 alone, building an export copy.

    Under a live HfDeepSpeedConfig, from_pretrained/from_config build inside zero.Init (a collective
    every rank must join) and peft's merge gathers parameters: neither may happen on one rank.
    """
    import transformers.integrations.deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's initial default, held fixed


def _libc() -> Any:
    """glibc, or None (musl, macOS): only glibc has mallopt(M_MMAP_THRESHOLD) and malloc_trim."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def bound_host_heap() -> None:
    """Keep host memory that ZeRO-3 frees from staying resident.

    zero.Init builds each module in full and then keeps a 1/world partition; every forward and backward
    gathers a layer and frees it again. glibc raises its mmap threshold to the size of each large
    block freed (up to 32 MiB), so after the first one, layer-sized tensors come from the heap, whose
    holes between the partitions that stay are never returned to the system: on two ranks that kept
    more than a full model resident per rank. A fixed threshold (mallopt disables the adjustment)
    keeps every block of 128 KiB and more a mapping of its own, unmapped when freed.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim_host_heap() -> None:
    """Return free heap pages to the system (glibc malloc_trim) after a phase that freed a lot."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@dataclass(frozen=True)
class HostMemory:
    """This process's resident memory (bytes) from /proc/self/status; peak is its high-water mark."""

    rss: int
    peak: int
    anonymous: int
    """Heap and anonymous mappings: tensors."""
    file: int
    """Mapped file pages (a safetensors checkpoint being read): page cache the kernel can reclaim."""


def host_memory() -> HostMemory:
    fields = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in fields:
                    fields[key] = int(value.split()[0]) * 1024  # kB
    except OSError:  # not Linux: resource's peak is all there is
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return HostMemory(rss=peak, peak=peak, anonymous=peak, file=0)
    return HostMemory(fields["VmRSS"], fields["VmHWM"], fields["RssAnon"], fields["RssFile"])


@dataclass
class Pretrained:
    """A loaded pretrained model and what its export needs."""

    module: CausalLM
    source_dir: Path
    method: Method
    lora: LoRA | None
    trust_remote_code: bool
    architecture: Architecture
    zero3_config: Any = None
    """The HfDeepSpeedConfig: transformers keeps only a weak reference, so it must live as long as the model."""

    @property
    def peft(self) -> bool:
        return self.lora is not None


def lora_config(lora: LoRA) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int, takes any number
        lora_dropout=lora.dropout,
        # peft's "all-linear": every nn.Linear/Conv1D except the output head.
        target_modules=list(lora.target_modules) or "all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )


def _quantization(cfg: TrainerConfig) -> Any:
    """The 4-bit NF4 config of QLoRA, or ConfigError (exit 2) where it cannot run."""
    if not torch.cuda.is_available():
        raise ConfigError(METHOD_FIELD, "QLoRA needs a CUDA GPU (bitsandbytes 4-bit); none is visible")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            METHOD_FIELD, "QLoRA needs bitsandbytes, which this image lacks (install the qlora extra)"
        )
    from transformers import BitsAndBytesConfig

    dtype = DTYPES[cfg.spec.training.precision]
    if dtype == torch.float32:
        dtype = torch.bfloat16  # compute in bf16: fp32 would undo the memory QLoRA saves
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # Stored in the compute dtype so DeepSpeed sees floating-point parameters it can shard.
        bnb_4bit_quant_storage=dtype,
    )


def load(cfg: TrainerConfig, ds_config: dict[str, Any], source_dir: Path, local_rank: int) -> Pretrained:
    """The pretrained model of ``cfg`` ready for deepspeed.initialize (adapters added for LoRA/QLoRA)."""
    import transformers.modeling_utils  # noqa: F401  # the bulk of the library, so ``before`` includes it
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    source = cfg.spec.model.pretrained
    assert source is not None
    tr = cfg.spec.training
    quantization = _quantization(cfg) if tr.method == Method.QLORA else None
    zero3 = int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3
    # Must exist before from_pretrained and stay referenced (transformers holds it weakly).
    keeper = HfDeepSpeedConfig(ds_config) if zero3 else None  # type: ignore[no-untyped-call]
    if zero3:
        bound_host_heap()
    before = host_memory()
    # transformers 5 always loads as low_cpu_mem_usage did (the kwarg is gone): the model on the meta
    # device, or inside zero.Init at ZeRO-3, the checkpoint memory-mapped; at ZeRO-3 only rank 0
    # copies values in (a gathered module at a time), the others read shapes only.
    kwargs: dict[str, Any] = dict(trust_remote_code=source.trust_remote_code, dtype=DTYPES[tr.precision])
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": local_rank}, dtype=None)
    model: Any
    try:
        model = AutoModelForCausalLM.from_pretrained(source_dir, **kwargs)
    except (ValueError, KeyError, OSError) as exc:
        hint = "" if source.trust_remote_code else " (trustRemoteCode is off)"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError("spec.model.pretrained.uri", f"cannot load {source_dir}: {first}{hint}") from exc
    model.config.use_cache = False  # training: a KV cache only costs memory
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=tr.activation_checkpointing
        )
    elif tr.activation_checkpointing:
        # Non-reentrant: works with frozen inputs and with ZeRO-3's parameter hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = tr.adapters
    if lora is not None:
        from peft import get_peft_model

        if tr.activation_checkpointing:
            # The embeddings are frozen, so the checkpointed blocks' inputs need grad to get a backward.
            model.enable_input_require_grads()
        try:
            model = get_peft_model(model, lora_config(lora))
        except ValueError as exc:  # target modules that match nothing
            raise ConfigError(TARGETS_FIELD, str(exc).splitlines()[0]) from exc
    module = CausalLM(model)
    trim_host_heap()  # the state dict and zero.Init's full-size module copies are gone by now
    module.memory_before_load, module.memory_loaded = before, host_memory()
    return Pretrained(
        module=module,
        source_dir=Path(source_dir),
        method=tr.method,
        lora=lora,
        trust_remote_code=source.trust_remote_code,
        architecture=architecture(model),
        zero3_config=keeper,
    )


def check_vocabulary(arch: Architecture, data_vocab: int) -> None:
    """DataError when the data holds token ids the model has no embedding for."""
    if data_vocab > arch.vocab:
        raise DataError(
            "paths.dataDir",
            f"the data's vocabulary ({data_vocab}) exceeds the model's ({arch.vocab}): "
            "prepare the data with the model's tokenizer",
        )


__all__ = [
    "Architecture",
    "CausalLM",
    "Pretrained",
    "architecture",
    "check_vocabulary",
    "lm_loss",
    "load",
    "lora_config",
    "zero3_init_off",
]
