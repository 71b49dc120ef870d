"""Byte-level BPE tokenizer: trained on the cleaned training split, or loaded from a file; or, with
``model.pretrained``, the model's own tokenizer (``Vocabulary`` is what the shards are written with).

Saved as ``tokenizer.json`` (the ``tokenizers`` format) plus ``tokenizer_config.json`` and
``special_tokens_map.json`` so ``PreTrainedTokenizerFast.from_pretrained(data_dir)`` works, and
``tokenizer_meta.json`` with the special tokens' strings and ids for code that needs no transformers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmtrain.config import ConfigError

if TYPE_CHECKING:
    # Imported where a tokenizer is trained or loaded: the scan, dedup and commit pods never need it.
    from tokenizers import Tokenizer

log = logging.getLogger("llmtrain.prepare")

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIALS = (EOS, PAD)
# 256 byte symbols plus the special tokens: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB = 256 + len(SPECIALS)
_EOS_CANDIDATES = (EOS, "</s>", "<eos>", "<|eot_id|>", "<|end_of_text|>")
_PAD_CANDIDATES = (PAD, "<pad>", "[PAD]", "<|padding|>")


@dataclass(frozen=True)
class TokenizerInfo:
    tokenizer: Tokenizer
    eos: str
    eos_id: int
    pad: str
    pad_id: int

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))


def train(texts: Iterable[str], vocab_size: int) -> TokenizerInfo:
    """A byte-level BPE with exactly ``vocab_size`` tokens (EOS id 0, PAD id 1).

    A small corpus can run out of merges before reaching the size; the remainder is filled with
    reserved special tokens so the embedding table the trainer builds always matches the vocabulary.
    """
    if vocab_size < MIN_VOCAB:
        raise ConfigError(
            "spec.model.vocabSize", f"a byte-level BPE needs at least {MIN_VOCAB} tokens, got {vocab_size}"
        )
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    info = _info(tok, "spec.data.tokenizer")
    assert info.vocab_size == vocab_size, (info.vocab_size, vocab_size)
    return info


def _first_present(tok: Tokenizer, candidates: tuple[str, ...]) -> tuple[str, int] | None:
    for token in candidates:
        tid = tok.token_to_id(token)
        if tid is not None:
            return token, int(tid)
    return None


def _info(tok: Tokenizer, field: str) -> TokenizerInfo:
    eos = _first_present(tok, _EOS_CANDIDATES)
    if eos is None:
        raise ConfigError(
            field, f"tokenizer has no end-of-text token (looked for {', '.join(_EOS_CANDIDATES)})"
        )
    # A loaded tokenizer without a pad token pads with EOS, as most causal LMs do; labels mask it.
    pad = _first_present(tok, _PAD_CANDIDATES) or eos
    return TokenizerInfo(tok, eos[0], eos[1], pad[0], pad[1])


def load(path: str, vocab_size: int) -> TokenizerInfo:
    """A tokenizer.json whose ids all fit the model's embedding table."""
    from tokenizers import Tokenizer

    field = "spec.data.tokenizer.path"
    try:
        tok = Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        raise ConfigError(field, f"cannot load tokenizer {path!r}: {exc}") from exc
    info = _info(tok, field)
    if info.vocab_size > vocab_size:
        raise ConfigError(
            "spec.model.vocabSize",
            f"tokenizer {path!r} has {info.vocab_size} tokens, more than vocabSize {vocab_size}",
        )
    return info


def save(info: TokenizerInfo, out_dir: Path, context_length: int) -> None:
    info.tokenizer.save(str(out_dir / "tokenizer.json"))
    specials = {"eos_token": info.eos, "pad_token": info.pad, "bos_token": info.eos, "unk_token": info.eos}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length, **specials}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    meta = {
        "eos_token": info.eos,
        "eos_id": info.eos_id,
        "pad_token": info.pad,
        "pad_id": info.pad_id,
        "vocab_size": info.vocab_size,
    }
    (out_dir / "tokenizer_meta.json").write_text(json.dumps(meta, indent=2) + "\n")


@dataclass(frozen=True)
class Vocabulary:
    """What shards are written with: the trained/loaded BPE above, or a pretrained model's tokenizer."""

    encode_batch: Callable[[list[str]], list[list[int]]]
    """Documents -> ids, each with the tokenizer's own leading special tokens (a BOS) but no EOS."""
    eos_id: int
    pad_id: int
    vocab_size: int
    save: Callable[[Path], None]
    """Writes the tokenizer files into the data directory (export and serving read them there)."""
    hf: Any = None
    """The transformers tokenizer, for a pretrained model (supervised records need it)."""


def bpe_vocabulary(info: TokenizerInfo, context_length: int) -> Vocabulary:
    def encode(texts: list[str]) -> list[list[int]]:
        # encode_batch runs on the tokenizers Rust thread pool, which uses every core.
        return [e.ids for e in info.tokenizer.encode_batch(texts, add_special_tokens=False)]

    return Vocabulary(
        encode, info.eos_id, info.pad_id, info.vocab_size, lambda out: save(info, out, context_length)
    )


def pretrained_vocabulary(hf: Any, field: str) -> Vocabulary:
    """A transformers tokenizer: its EOS ends every document, PAD falls back to EOS (most causal LMs
    have none), and ``len(hf)`` (added tokens included) is the vocabulary the shards' ids fit in."""
    from llmtrain.prepare.records import special_prefix

    if hf.eos_token_id is None:
        raise ConfigError(field, "the tokenizer has no end-of-text (eos) token to end records with")
    eos_id = int(hf.eos_token_id)
    pad_id = eos_id if hf.pad_token_id is None else int(hf.pad_token_id)
    prefix = special_prefix(hf)

    def encode(texts: list[str]) -> list[list[int]]:
        return [prefix + list(ids) for ids in hf(texts, add_special_tokens=False)["input_ids"]]

    def save_hf(out: Path) -> None:
        hf.save_pretrained(out)
        meta = {
            "eos_token": hf.eos_token,
            "eos_id": eos_id,
            "pad_token": hf.pad_token or hf.eos_token,
            "pad_id": pad_id,
            "vocab_size": len(hf),
        }
        (out / "tokenizer_meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    return Vocabulary(encode, eos_id, pad_id, len(hf), save_hf, hf)


def load_pretrained(config: TrainerConfig) -> Vocabulary:
    """The Vocabulary of ``config``'s pretrained model (sources.load_tokenizer: DataError when absent)."""
    from llmtrain import sources

    source = config.spec.model.pretrained
    assert source is not None
    field = sources.TOKENIZER_FIELD if source.tokenizer else sources.MODEL_FIELD
    vocab = pretrained_vocabulary(sources.load_tokenizer(config), field)
    log.info("tokenizer: pretrained, %d tokens, eos %d, pad %d", vocab.vocab_size, vocab.eos_id, vocab.pad_id)
    return vocab
