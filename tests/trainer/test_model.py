"""The Llama model: transformers parity, penalty gradients, masks, initialisation."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llmop_contract.api.v1alpha1.model import ModelSpec
from llmtrain.adapt import llama_args
from llmtrain.model import LlamaArgs, build_model
from llmtrain.testing import license_documents, write_shards
from llmtrain.train.data import read_manifest
from llmtrain.train.export import export_model, hf_state_dict


def tiny(**kw: object) -> LlamaArgs:
    """The model arguments of a small ModelSpec (camelCase overrides), through the one adapter."""
    base: dict[str, object] = {
        "hiddenSize": 64,
        "numLayers": 2,
        "numHeads": 4,
        "intermediateSize": 96,
        "vocabSize": 512,
        "contextLength": 32,
    }
    return llama_args(ModelSpec.model_validate({**base, **kw}))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("data"), license_documents()[:200])


@pytest.mark.parametrize(
    "shape",
    [
        {"numKeyValueHeads": 2, "tieEmbeddings": True},
        {"numKeyValueHeads": 4, "tieEmbeddings": False},
        {"numKeyValueHeads": 1, "tieEmbeddings": True, "initialization": {"scheme": "He"}},
    ],
)
def test_export_loads_in_transformers_with_matching_logits(
    shape: dict[str, object], data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = tiny(**shape)
    ours = build_model(spec, seed=7).eval()
    out = export_model(ours.state_dict(), spec, read_manifest(data_dir), data_dir, tmp_path / "model")
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in theirs.parameters()) == spec.num_parameters()
    idx = torch.randint(
        0, spec.vocab_size, (3, spec.context_length), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ours_logits, _ = ours(idx)
        their_logits = theirs(idx).logits
    torch.testing.assert_close(ours_logits, their_logits, rtol=1e-5, atol=1e-5)

    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok("This License", return_tensors="pt")
    generated = theirs.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert tok.decode(generated[0]).startswith("This License")


def test_sparse_masks_are_applied_in_forward_and_export() -> None:
    spec = tiny()
    model = build_model(spec, seed=1, sparse=True)
    layer = model.layers[0].mlp.up_proj
    assert layer.mask is not None
    layer.mask[:, ::2] = 0
    exported = hf_state_dict(model.state_dict(), spec)
    w = exported["model.layers.0.mlp.up_proj.weight"]
    assert bool((w[:, ::2] == 0).all()) and bool((w[:, 1::2] != 0).all())
    assert not any(k.endswith(".mask") for k in exported)
    x = torch.randn(2, 5, spec.hidden_size)
    torch.testing.assert_close(layer(x), x @ (layer.weight * layer.mask).T)


def test_penalty_gradient_equals_autograd_of_explicit_penalty() -> None:
    spec = tiny(tieEmbeddings=False)
    l1, l2 = 1e-3, 1e-2
    idx = torch.randint(0, spec.vocab_size, (2, 16))
    a = build_model(spec, seed=3)
    a.set_penalty(l1, l2)
    loss, penalty = a(idx, idx)
    (loss + penalty).backward()

    b = build_model(spec, seed=3)
    loss_b, zero = b(idx, idx)
    assert float(zero) == 0.0
    explicit = sum(l1 * m.weight.abs().sum() + l2 * m.weight.pow(2).sum() for m in b.linears())
    (loss_b + explicit).backward()
    torch.testing.assert_close(penalty, explicit.detach())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert pa.grad is not None and pb.grad is not None
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def count_block_forwards(model: torch.nn.Module) -> list[int]:
    """A list that counts, per transformer block, how often its forward has started from now on.

    A pre-hook: checkpoint's recomputation stops as soon as it has the tensors backward needs, so a
    block recomputed in backward may never reach the end of its forward.
    """
    calls = [0] * len(model.layers)

    def counter(i: int) -> Callable[..., None]:
        def hook(*_: object) -> None:
            calls[i] += 1

        return hook

    for i, block in enumerate(model.layers):
        block.register_forward_pre_hook(counter(i))
    return calls


def test_activation_checkpointing_recomputes_blocks_in_backward_with_same_gradients() -> None:
    spec = tiny()
    idx = torch.randint(0, spec.vocab_size, (2, 16))
    grads = []
    for ckpt in (False, True):
        model = build_model(spec, seed=5, activation_checkpointing=ckpt)
        calls = count_block_forwards(model)
        loss, _ = model(idx, idx)
        assert calls == [1] * spec.num_layers
        loss.backward()
        # Checkpointing is really on: each block's forward runs again during backward (and only then).
        assert calls == [2 if ckpt else 1] * spec.num_layers, (ckpt, calls)
        grads.append([p.grad for p in model.parameters()])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1)


def test_normal_init_scales_residual_projections() -> None:
    spec = tiny(numLayers=8, hiddenSize=256, numHeads=4, intermediateSize=512)
    model = build_model(spec, seed=0)
    std = spec.init_std
    assert model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    residual = model.layers[0].self_attn.o_proj.weight.std().item()
    assert residual == pytest.approx(std / math.sqrt(2 * spec.num_layers), rel=0.05)
    assert bool((model.norm.weight == 1).all())


def test_xavier_and_he_init_bounds() -> None:
    spec = tiny(hiddenSize=256, intermediateSize=512, initialization={"scheme": "Xavier"})
    w = build_model(spec, seed=0).layers[0].mlp.up_proj.weight
    bound = math.sqrt(6 / (256 + 512))
    assert w.abs().max().item() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    spec = tiny(hiddenSize=256, intermediateSize=512, initialization={"scheme": "He"})
    w = build_model(spec, seed=0).layers[0].mlp.up_proj.weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)


@pytest.mark.parametrize(
    "shape",
    [
        {},
        {"numKeyValueHeads": 2, "tieEmbeddings": False},
        {"initialization": {"scheme": "Xavier", "std": 0.01}},
    ],
)
def test_adapter_keeps_every_model_figure_of_the_spec(shape: dict[str, object]) -> None:
    spec = ModelSpec.model_validate({"hiddenSize": 64, "numHeads": 4, "vocabSize": 512, **shape}).scratch()
    args = llama_args(spec)
    assert args.num_parameters() == spec.num_parameters()
    assert args.num_key_value_heads == (spec.num_key_value_heads or spec.num_heads)
    assert (args.init.value, args.init_std) == (spec.initialization.scheme.value, spec.initialization.std)
    assert (args.vocab_size, args.context_length, args.tie_embeddings) == (
        spec.vocab_size,
        spec.context_length,
        spec.tie_embeddings,
    )
