"""The serving engine's batch on Hugging Face causal LMs of several architectures, and ``--device``.

Each architecture's tiny random checkpoint is made here (its transformers config class and
``save_pretrained``; nothing from a hub) and loaded the way ``llmtrain serve`` loads it. The check a
user relies on: prompts of different lengths joining and leaving mid-decode get, token for token,
what transformers' own ``generate(do_sample=False)`` gives each prompt alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtrain.compress.device import DeviceError, resolve_device
from llmtrain.compress.layout import FORMAT, LAYOUT_QUANTIZED, MARKER
from llmtrain.compress.load import model_device_for
from llmtrain.serve.batch import RunningBatch
from llmtrain.serve.loader import LoadedModel, context_length, load
from llmtrain.testing_hf import tokenizer

POSITIONS = 256
_BLOCK: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
_ATTN: dict[str, Any] = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS)
# Sliding windows far shorter than a prompt plus its completion, so the window is really exercised.
WINDOW = 6


def config(arch: str) -> Any:
    import transformers as t

    if arch == "llama":  # the project's own export is a LlamaForCausalLM
        return t.LlamaConfig(**_BLOCK, **_ATTN)
    if arch == "qwen2":
        return t.Qwen2Config(**_BLOCK, **_ATTN, tie_word_embeddings=True)
    if arch == "mistral-sliding":
        return t.MistralConfig(**_BLOCK, **_ATTN, sliding_window=WINDOW)
    if arch == "gemma":
        return t.GemmaConfig(**_BLOCK, **_ATTN, head_dim=16)
    if arch == "gemma2-sliding":  # alternating sliding and full layers, logit soft-capping
        return t.Gemma2Config(**_BLOCK, **_ATTN, head_dim=16, sliding_window=WINDOW)
    if arch == "phi3":
        return t.Phi3Config(**_BLOCK, **_ATTN)
    if arch == "gpt2":  # absolute positions, Conv1D projections, context in n_positions
        return t.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=POSITIONS)
    if arch == "gpt-neox":  # partial rotary
        return t.GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=POSITIONS,
        )  # fmt: skip
    if arch == "opt":  # learned positions offset by 2
        return t.OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=POSITIONS, word_embed_proj_dim=64,
        )  # fmt: skip
    if arch == "bloom":  # ALiBi: no position_ids, positions come from the mask -> per-row path
        return t.BloomConfig(hidden_size=64, n_layer=2, n_head=4)
    raise ValueError(arch)


SPLICED = ("llama", "qwen2", "mistral-sliding", "gemma", "gemma2-sliding", "phi3", "gpt2", "gpt-neox", "opt")
PER_ROW = ("bloom",)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tokenizer(tmp_path_factory.mktemp("tokenizer"))


def checkpoint(arch: str, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = config(arch)
    cfg.vocab_size = len(tok)
    cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = tok.eos_token_id, tok.pad_token_id, None
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)  # type: ignore[no-untyped-call]
    if arch == "bloom":  # no trained length in an ALiBi config: the tokenizer states the limit
        tok.model_max_length = POSITIONS
    tok.save_pretrained(out)
    return out


def greedy_alone(model: Any, prompt: list[int], n: int) -> list[int]:
    """transformers' generate() on one unpadded prompt: the reference for every batched row.

    No end-of-text token: generate would stop there (and min_new_tokens would forbid it, changing
    the argmax), while the batch keeps decoding; the engine's stopping is tested elsewhere.
    """
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None
    )
    return [int(t) for t in out[0, len(prompt) :]]


def decode_with_joins(
    batch: RunningBatch, prompts: dict[str, list[int]], logits: dict[str, list[torch.Tensor]] | None = None
) -> dict[str, list[int]]:
    """Greedy decoding where prompts join at different steps (two in one prefill) and leave early.

    ``logits``, when given, receives each row's next-token logits at every step.
    """
    names = list(prompts)
    joins = dict(zip(names, (0, 3, 7, 7), strict=True))
    lengths = dict(zip(names, (9, 14, 12, 6), strict=True))
    rows: list[str] = []
    got: dict[str, list[int]] = {name: [] for name in names}
    pending: list[int] = []
    for step in range(40):
        keep = [i for i, name in enumerate(rows) if len(got[name]) < lengths[name]]
        batch.keep(keep)
        pending, rows = [pending[i] for i in keep], [rows[i] for i in keep]
        if pending:
            batch.advance(pending)
        new = [name for name, at in joins.items() if at == step]
        if new:
            batch.add([prompts[name] for name in new])
            rows += new
        if not rows:
            break
        assert batch.logits.dtype == torch.float32 and batch.logits.device.type == "cpu"
        pending = [int(t) for t in batch.logits.argmax(-1)]
        for i, (name, token) in enumerate(zip(rows, pending, strict=True)):
            got[name].append(token)
            if logits is not None:
                logits.setdefault(name, []).append(batch.logits[i])
    assert batch.rows == 0
    return got


@pytest.mark.parametrize("arch", SPLICED + PER_ROW)
def test_rows_joining_mid_decode_match_generate_alone(arch: str, tokenizer_dir: Path, tmp_path: Path) -> None:
    loaded: LoadedModel = load(checkpoint(arch, tokenizer_dir, tmp_path / arch))
    tok = loaded.tokenizer
    texts = [
        "Permission is hereby granted",
        "THE SOFTWARE IS PROVIDED",
        "Copyright",
        "the above copyright notice",
    ]
    prompts = {f"p{i}": tok(text)["input_ids"] for i, text in enumerate(texts)}
    assert len({len(p) for p in prompts.values()}) == len(prompts)  # really different lengths
    batch = RunningBatch(loaded.model, loaded.pad_id)
    assert batch.spliced == (arch in SPLICED)
    logits: dict[str, list[torch.Tensor]] = {}
    got = decode_with_joins(batch, prompts, logits)
    for name, prompt in prompts.items():
        assert got[name] == greedy_alone(loaded.model, prompt, len(got[name])), name
        # Tokens alone can hide a wrong position in a random model; the logits cannot: each step's
        # equal the model's on the row's whole text in one pass, up to float32 rounding.
        with torch.no_grad():
            alone = loaded.model(torch.tensor([prompt + got[name][:-1]])).logits[0, len(prompt) - 1 :]
        torch.testing.assert_close(torch.stack(logits[name]), alone.float(), atol=1e-4, rtol=1e-4)


def test_context_length_is_read_by_each_architectures_name(tokenizer_dir: Path, tmp_path: Path) -> None:
    for arch in ("llama", "gpt2", "opt"):
        assert load(checkpoint(arch, tokenizer_dir, tmp_path / arch)).context_length == POSITIONS
    bloom = config("bloom")  # ALiBi has no trained length: the tokenizer's limit, or a refusal
    assert context_length(bloom, type("Tok", (), {"model_max_length": 1024})()) == 1024
    with pytest.raises(ValueError, match="n_positions"):
        context_length(bloom, type("Tok", (), {"model_max_length": int(1e30)})())


def test_a_cache_that_cannot_be_spliced_falls_back_to_per_row(
    tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An architecture whose cache is not plain per-column tensors is found out at its first prefill."""
    import llmtrain.serve.batch as batch_module

    loaded = load(checkpoint("llama", tokenizer_dir, tmp_path / "llama"))
    monkeypatch.setattr(batch_module, "_plain_cache", lambda cache, rows, columns: False)
    batch = RunningBatch(loaded.model, loaded.pad_id)
    prompts = {f"p{i}": list(range(3, 3 + n)) for i, n in enumerate((4, 9, 1, 6))}
    got = decode_with_joins(batch, prompts)
    assert not batch.spliced
    for name, prompt in prompts.items():
        assert got[name] == greedy_alone(loaded.model, prompt, len(got[name])), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")
def test_device_auto_is_cpu_and_cuda_is_refused_without_a_gpu(tokenizer_dir: Path, tmp_path: Path) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    model_dir = checkpoint("llama", tokenizer_dir, tmp_path / "llama")
    assert next(load(model_dir, device="auto").model.parameters()).device.type == "cpu"
    served = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", "serve", "--model-dir", str(model_dir), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert served.returncode == 2, served.stderr
    assert "--device cuda: torch" in served.stderr and "sees no CUDA GPU" in served.stderr


def test_quantized_layout_stays_on_the_cpu(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / MARKER).write_text(json.dumps({"format": FORMAT, "layout": LAYOUT_QUANTIZED}))
    assert model_device_for(tmp_path, "auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="CPU int8/int4 kernels"):
        model_device_for(tmp_path, "cuda")


@pytest.mark.gpu
def test_on_cuda_rows_match_generate_and_logits_stay_on_the_cpu(tokenizer_dir: Path, tmp_path: Path) -> None:
    loaded = load(checkpoint("qwen2", tokenizer_dir, tmp_path / "qwen2"), device="auto")
    assert next(loaded.model.parameters()).device.type == "cuda"
    prompts = {f"p{i}": list(range(3, 3 + n)) for i, n in enumerate((4, 9, 1, 6))}
    got = decode_with_joins(RunningBatch(loaded.model, loaded.pad_id), prompts)
    for name, prompt in prompts.items():
        ids = torch.tensor([prompt], device="cuda")
        out = loaded.model.generate(  # type: ignore[operator]
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(got[name]), do_sample=False,
            eos_token_id=None,
        )  # fmt: skip
        assert got[name] == [int(t) for t in out[0, len(prompt) :]], name
