"""Tiny Hugging Face checkpoints of several families, made locally, for tests and benchmarks.

Nothing can be downloaded here, so a "pretrained" model is built with transformers' own config
class of each family, random weights, and ``save_pretrained``: the same files (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json with a chat template) a hub snapshot has,
which is all the loading code reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmtrain.testing import license_documents

# A ChatML template (the one Qwen2 ships), so Chat records render the way a real instruct model's do.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
VOCAB = 512

# Small enough to train in seconds on a CPU, each with the family's own block layout.
_SHAPE: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "gemma", "phi3")


def tokenizer(out_dir: str | Path, vocab_size: int = VOCAB) -> Path:
    """A byte-level BPE trained on the system's licence texts, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(license_documents(), trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[1], bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


def config(family: str, vocab_size: int, eos_id: int, pad_id: int) -> Any:
    """The family's transformers config at a tiny size."""
    import transformers as t

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None
    )
    attn: dict[str, Any] = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if family == "llama":
        return t.LlamaConfig(**_SHAPE, **attn, **common, tie_word_embeddings=False)
    if family == "qwen2":
        return t.Qwen2Config(**_SHAPE, **attn, **common, tie_word_embeddings=True)
    if family == "mistral":
        return t.MistralConfig(**_SHAPE, **attn, **common, sliding_window=None)
    if family == "gemma":
        return t.GemmaConfig(**_SHAPE, **attn, head_dim=16, **common)
    if family == "phi3":
        return t.Phi3Config(**_SHAPE, **attn, **common)
    if family == "gpt2":
        return t.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")


def checkpoint(
    family: str, out_dir: str | Path, seed: int = 0, tokenizer_dir: str | Path | None = None
) -> Path:
    """A random-weight ``family`` causal LM with its tokenizer in ``out_dir`` (Hugging Face layout)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else tokenizer(out / ".tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = config(family, len(tok), tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)  # type: ignore[no-untyped-call]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
