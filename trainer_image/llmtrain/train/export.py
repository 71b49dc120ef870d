"""Export the trained model in Hugging Face layout (safetensors, config.json, tokenizer).

A model from scratch exports as LlamaForCausalLM: our parameter names are its names minus the
``model.`` prefix, so export is a key rename, pruning masks multiplied in, and the tied head left out
(transformers re-ties it from config).

A pretrained model exports as its own architecture: Full fine-tuning writes the gathered weights
through transformers' save_pretrained; LoRA writes the adapter alone in peft format (``adapter/``) and
the merged model (base + scale x B A, peft's merge_and_unload) as a plain model (``model/``), which
compression, serving and vLLM load like any other checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor

from llmop_contract.protocol import DataManifest
from llmtrain.model.args import LlamaArgs
from llmtrain.model.hf import Pretrained, zero3_init_off
from llmtrain.model.llama import RMS_NORM_EPS, ROPE_THETA


def hf_state_dict(state: dict[str, Tensor], args: LlamaArgs) -> dict[str, Tensor]:
    """Our state dict -> LlamaForCausalLM's (masks applied, contiguous, unshared tensors)."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name.endswith(".mask"):
            continue
        if name == "lm_head.weight" and args.tie_embeddings:
            continue
        mask = state.get(name.removesuffix(".weight") + ".mask") if name.endswith(".weight") else None
        value = tensor * mask.to(tensor.dtype) if mask is not None else tensor
        key = name if name.startswith("lm_head.") else "model." + name
        out[key] = value.detach().to("cpu").contiguous().clone()
    return out


def export_model(
    state: dict[str, Tensor], args: LlamaArgs, manifest: DataManifest, data_dir: str | Path, out_dir: Path
) -> Path:
    """Write safetensors, config.json, generation_config.json and tokenizer files to ``out_dir``.

    ``manifest`` is the one in ``data_dir``, where the tokenizer it names lies.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

    tensors = hf_state_dict(state, args)
    tokenizer_file = Path(data_dir) / manifest.tokenizer
    dtype = next(iter(tensors.values())).dtype
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_file=str(tokenizer_file),
        eos_token=_token(tokenizer_file, manifest.eos_id),
        pad_token=_token(tokenizer_file, manifest.pad_id),
    )
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.context_length,
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=args.tie_embeddings,
        bos_token_id=None,
        eos_token_id=manifest.eos_id,
        pad_token_id=manifest.pad_id,
        dtype=str(dtype).removeprefix("torch."),
        architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(tmp)
    GenerationConfig(  # type: ignore[no-untyped-call]
        eos_token_id=manifest.eos_id, pad_token_id=manifest.pad_id
    ).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
    return out_dir


def _token(tokenizer_file: Path, token_id: int) -> str:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file)).id_to_token(token_id)
    if tok is None:
        raise ValueError(f"token id {token_id} is not in {tokenizer_file.name}")
    return str(tok)


def _commit(tmp: Path, out_dir: Path) -> Path:
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
    return out_dir


def _fresh(out_dir: Path) -> Path:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def _save_tokenizer(tokenizer_dir: Path, out: Path, trust_remote_code: bool) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code).save_pretrained(out)


def _strip(state: dict[str, Tensor], prefix: str = "model.") -> dict[str, Tensor]:
    """The wrapper's (hf.CausalLM) keys -> the wrapped model's."""
    return {k.removeprefix(prefix): v.detach().to("cpu").contiguous() for k, v in state.items()}


def export_pretrained_full(
    state: dict[str, Tensor], pre: Pretrained, tokenizer_dir: Path, out_dir: Path
) -> Path:
    """The fully fine-tuned model: a meta-device copy of the architecture takes the gathered tensors
    (``assign``: no second copy of the weights) and transformers writes it, tied weights once."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = copy.deepcopy(pre.module.model.config)
    config.use_cache = True  # off for training only; serving wants it
    tensors = _strip(state)
    with zero3_init_off(), torch.device("meta"):
        shadow = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, trust_remote_code=pre.trust_remote_code, dtype=next(iter(tensors.values())).dtype
        )
    shadow.load_state_dict(tensors, assign=True, strict=True)
    shadow.tie_weights()
    if (pre.source_dir / "generation_config.json").is_file():
        shadow.generation_config = GenerationConfig.from_pretrained(pre.source_dir)
    tmp = _fresh(out_dir)
    with zero3_init_off():  # rank 0 alone: nothing in here may start a collective
        shadow.save_pretrained(tmp)
        _save_tokenizer(tokenizer_dir, tmp, pre.trust_remote_code)
    return _commit(tmp, out_dir)


def export_pretrained_lora(
    adapter_state: dict[str, Tensor],
    pre: Pretrained,
    dtype: Any,
    tokenizer_dir: Path,
    out_dir: Path,
    adapter_dir: Path,
) -> tuple[Path, Path]:
    """The adapter alone (peft format) and the merged model; ``adapter_state`` holds the gathered
    adapter tensors under the wrapper's names. The base is re-read from the source, so only the
    (small) adapters had to be gathered across ranks."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = pre.module.model
    tmp = _fresh(adapter_dir)
    with zero3_init_off():
        peft_model.save_pretrained(tmp, state_dict=_strip(adapter_state), save_embedding_layers=False)
        _save_tokenizer(tokenizer_dir, tmp, pre.trust_remote_code)
        adapter = _commit(tmp, adapter_dir)
        base = AutoModelForCausalLM.from_pretrained(
            pre.source_dir, dtype=dtype, trust_remote_code=pre.trust_remote_code
        )
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        merged.config.use_cache = True
        tmp = _fresh(out_dir)
        merged.save_pretrained(tmp)
        _save_tokenizer(tokenizer_dir, tmp, pre.trust_remote_code)
    return _commit(tmp, out_dir), adapter


def trainable_state_dict(engine: object, zero_stage: int) -> dict[str, Tensor] | None:
    """The parameters that train (LoRA: the adapters), whole, on rank 0 (a collective under ZeRO-3)."""
    import deepspeed
    import torch.distributed as dist

    module = engine.module  # type: ignore[attr-defined]
    rank = dist.get_rank() if dist.is_initialized() else 0
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    context = (
        deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
        if zero_stage == 3
        else contextlib.nullcontext()
    )
    with context:
        return {n: p.detach().clone() for n, p in named} if rank == 0 else None


def gathered_state_dict(engine: object, zero_stage: int) -> dict[str, Tensor] | None:
    """The module's state on rank 0's CPU, gathered one tensor at a time (a collective under ZeRO-3).

    Gathering everything at once would put the whole model on every rank; this way only rank 0,
    which has to write it, ever holds more than one parameter. Tied names share one tensor.
    """
    import deepspeed
    import torch.distributed as dist

    module = engine.module  # type: ignore[attr-defined]
    rank = dist.get_rank() if dist.is_initialized() else 0
    copies: dict[int, Tensor] = {}
    out: dict[str, Tensor] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in copies:
            sharded = zero_stage == 3 and hasattr(tensor, "ds_id")
            context = (
                deepspeed.zero.GatheredParameters([tensor], modifier_rank=None)
                if sharded
                else contextlib.nullcontext()
            )
            with context:
                if rank == 0:
                    copies[id(tensor)] = tensor.detach().to("cpu", copy=True)
        if rank == 0:
            out[name] = copies[id(tensor)]
    return out if rank == 0 else None


def full_state_dict(engine: object, zero_stage: int) -> dict[str, Tensor] | None:
    """The whole module state on rank 0 (a collective under ZeRO-3 and tensor parallel); None on other ranks."""
    import deepspeed
    import torch.distributed as dist

    module = engine.module  # type: ignore[attr-defined]
    rank = dist.get_rank() if dist.is_initialized() else 0
    autotp = getattr(engine, "autotp_size", None)
    if autotp is not None and autotp() > 1:
        # AutoTP's sharded layers gathered back to whole matrices, layer by layer, onto rank 0 (a
        # collective). DeepSpeed's own gather (GatherReplacedLayerParams), which keeps the dtype.
        gathered: dict[str, Tensor] | None = engine._consolidated_16bit_state_dict()  # type: ignore[attr-defined]
        return gathered
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().clone() for k, v in module.state_dict().items()} if rank == 0 else None
        return state
    return {k: v.detach() for k, v in module.state_dict().items()} if rank == 0 else None


__all__ = [
    "export_model",
    "export_pretrained_full",
    "export_pretrained_lora",
    "full_state_dict",
    "gathered_state_dict",
    "hf_state_dict",
    "trainable_state_dict",
]
