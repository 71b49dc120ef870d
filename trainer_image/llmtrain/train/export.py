"""Export the trained model as a transformers LlamaForCausalLM directory.

Our parameter names are LlamaForCausalLM's minus the ``model.`` prefix, so export is a key rename,
pruning masks multiplied in, and the tied head left out (transformers re-ties it from config).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import Tensor

from llmop_contract.protocol import DataManifest
from llmtrain.model.args import LlamaArgs
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


def full_state_dict(engine: object, zero_stage: int) -> dict[str, Tensor] | None:
    """The whole module state on rank 0 (a collective under ZeRO-3); None on other ranks."""
    import deepspeed
    import torch.distributed as dist

    module = engine.module  # type: ignore[attr-defined]
    rank = dist.get_rank() if dist.is_initialized() else 0
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().clone() for k, v in module.state_dict().items()} if rank == 0 else None
        return state
    return {k: v.detach() for k, v in module.state_dict().items()} if rank == 0 else None


__all__ = ["export_model", "full_state_dict", "hf_state_dict"]
