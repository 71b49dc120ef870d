"""In-process checks of the pretrained-model wrapper: packed records attend within themselves only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmtrain import testing_hf
from llmtrain.model.args import LlamaArgs
from llmtrain.model.hf import CausalLM, lm_loss
from llmtrain.model.llama import build_model


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing_hf.tokenizer(tmp_path_factory.mktemp("tok"))


def _packed_vs_alone(model: torch.nn.Module) -> float:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 500, (1, 7), generator=gen), torch.randint(0, 500, (1, 9), generator=gen)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(9)]).unsqueeze(0)
    with torch.no_grad():
        together, _ = model(packed, None, positions)
        alone = torch.cat([model(a)[0], model(b)[0]], dim=1)
    return float((together - alone).abs().max())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_records_equal_each_alone(family: str, attn: str, tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = testing_hf.checkpoint(family, tmp_path / family, tokenizer_dir=tokenizer_dir)
    model = CausalLM(AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)).eval()
    assert _packed_vs_alone(model) < 1e-5
    # Without positions the second record would see the first: the check above can fail.
    packed = torch.randint(0, 500, (1, 16))
    with torch.no_grad():
        plain, _ = model(packed)
        split, _ = model(packed, None, torch.cat([torch.arange(7), torch.arange(9)]).unsqueeze(0))
    assert (plain[:, 7:] - split[:, 7:]).abs().max() > 1e-4


def test_scratch_llama_takes_positions_the_same_way() -> None:
    args = LlamaArgs(512, 64, 2, 4, 2, 128, 64)
    model = build_model(args, seed=0).eval()
    assert _packed_vs_alone(model) < 1e-5


def test_loss_ignores_masked_targets() -> None:
    logits = torch.randn(1, 5, 11)
    targets = torch.tensor([[1, 2, 3, 4, 5]])
    masked = targets.clone()
    masked[0, :2] = -100
    other = masked.clone()
    other[0, 0] = -100  # changing a masked (prompt) label's value does not matter
    assert torch.equal(lm_loss(logits, masked), lm_loss(logits, other))
    assert not torch.equal(lm_loss(logits, masked), lm_loss(logits, targets))
    assert lm_loss(logits, torch.full_like(targets, -100)) == 0  # all prompt: 0, not NaN
