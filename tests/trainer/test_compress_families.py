"""`llmtrain compress` on Hugging Face families other than the project's own Llama export.

Each family's tiny random-weight checkpoint (llmtrain.testing_hf) is placed where a fine-tune leaves
its merged model (``<outputDir>/model``), beside val/train shards of the licence corpus, and every
stage runs as the pod runs it (a subprocess). The checks are the ones a user relies on: the stage
exits 0, the result loads back as the same architecture, and its figures are what the method
promises (int8 about a quarter of the fp32 bytes at nearly the same perplexity, magnitude pruning
the asked sparsity, structured pruning fewer heads and channels, or a clear refusal where the
architecture has fused projections).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from llmtrain.compress.load import load_model
from llmtrain.testing import debug_config, license_documents, write_shards
from llmtrain.testing_hf import checkpoint, tokenizer
from tests.trainer.conftest import train_env

pytestmark = pytest.mark.slow

COMPRESSION = {
    "quantization": [{"method": "Int8WeightOnly"}, {"method": "Int4WeightOnly", "groupSize": 32}],
    "pruning": [
        {"method": "Magnitude", "sparsity": 0.5, "recoverySteps": 2},
        {"method": "Structured", "sparsity": 0.5},
    ],
    # A Llama student a quarter of the width of the (non-Llama) teacher, with the teacher's vocabulary.
    "distillation": {
        "student": {"hiddenSize": 32, "numLayers": 1, "numHeads": 2, "intermediateSize": 64},
        "steps": 4,
        "learningRate": 0.001,
    },
}
SHORT = {"training": {"sequenceLength": 64, "microBatchSize": 2, "globalBatchSize": 2}}
ARCH = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gemma": "GemmaForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
STRUCTURED = ("llama", "qwen2", "mistral", "gemma")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("data"), license_documents()[:200])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tokenizer(tmp_path_factory.mktemp("tok"))


def job(family: str, root: Path, data_dir: Path, tok_dir: Path) -> Path:
    """A config whose outputDir/model is the family's checkpoint, as a fine-tune exports it."""
    config = debug_config(root, data_dir, {**SHORT, "compression": COMPRESSION})
    checkpoint(family, root / "output" / "model", seed=1, tokenizer_dir=tok_dir)
    return config


def compress(config: Path, stage: str, *flags: str) -> tuple[int, str, dict[str, Any]]:
    termination = config.parent / f"termination-{stage}.json"
    env = {**train_env(), "LLMOP_TERMINATION_LOG": str(termination)}
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", "compress", str(config), "--stage", stage, *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    message = json.loads(termination.read_text()) if termination.exists() else {}
    if proc.returncode == 0:
        r = message["results"]
        print(
            f"{stage}: perplexity {r['baselinePerplexity']:.2f} -> {r['perplexity']:.2f}, "
            f"size ratio {r['sizeRatio']:.3f}, parameter ratio {r['parameterRatio']:.3f}, "
            f"sparsity {r['sparsity']:.3f}"
        )
    else:
        print(proc.stdout[-2000:], proc.stderr[-2000:])
    return proc.returncode, proc.stderr, message


# Llama's layout is the trained fixture's (tests/trainer/test_compress.py) and Mistral's the same:
# the families here are the ones with a different one (biases, Conv1D, fused projections, norms).
@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gemma", "phi3"])
def test_every_family_quantises_and_prunes(
    family: str, tmp_path: Path, data_dir: Path, tok_dir: Path
) -> None:
    config = job(family, tmp_path, data_dir, tok_dir)
    output = Path(yaml.safe_load(config.read_text())["paths"]["outputDir"])
    print(f"--- {family}")

    code, stderr, message = compress(config, "quantize-0")
    assert code == 0, stderr
    r = message["results"]
    # Embedding and head are int8 too: about a quarter of fp32; GPT-2's learned position table (a
    # fifth of this tiny model) and biases stay in float, so it lands near 0.42.
    assert r["sizeRatio"] < (0.45 if family == "gpt2" else 0.32)
    assert abs(math.log(r["perplexity"] / r["baselinePerplexity"])) < 0.03
    quantised: Any = load_model(output / "compressed" / "quantize-0")
    assert type(quantised).__name__ == ARCH[family]

    code, stderr, message = compress(config, "quantize-1")
    assert code == 0, stderr
    int8_ratio = r["sizeRatio"]
    assert message["results"]["sizeRatio"] < int8_ratio  # int4 decoder layers: smaller than int8
    assert math.isfinite(message["results"]["perplexity"])

    code, stderr, message = compress(config, "prune-0")
    assert code == 0, stderr
    r = message["results"]
    assert r["sparsity"] == pytest.approx(0.5, abs=0.01) and r["baselineSparsity"] < 0.01
    assert math.isfinite(r["perplexity"]) and r["recoverySteps"] == 2.0

    code, stderr, message = compress(config, "prune-1")
    if family in STRUCTURED:
        assert code == 0, stderr
        pruned: Any = load_model(output / "compressed" / "prune-1")
        assert type(pruned).__name__ == ARCH[family]
        assert pruned.config.intermediate_size == 64 and message["results"]["parameterRatio"] < 0.95
        assert math.isfinite(message["results"]["perplexity"])
    else:
        assert code == 2
        assert "spec.compression.pruning[1].method" in stderr and "llama, mistral, qwen2, gemma" in stderr


def test_distillation_from_a_non_llama_teacher(tmp_path: Path, data_dir: Path, tok_dir: Path) -> None:
    config = job("qwen2", tmp_path, data_dir, tok_dir)
    code, stderr, message = compress(config, "distill")
    assert code == 0, stderr
    student: Any = load_model(Path(message["modelPath"]))
    assert type(student).__name__ == "LlamaForCausalLM"
    assert student.config.vocab_size == 512 and message["results"]["parameterRatio"] < 0.6


def test_device_cuda_is_refused_for_quantisation_and_without_a_gpu(
    tmp_path: Path, data_dir: Path, tok_dir: Path
) -> None:
    config = job("qwen2", tmp_path, data_dir, tok_dir)
    # The quantized layout runs on PyTorch's CPU kernels: refused on any machine, GPU or not.
    code, stderr, message = compress(config, "quantize-0", "--device", "cuda")
    assert code == 2 and message["exitCode"] == 2, stderr[-2000:]
    assert "--device cuda: quantize-0 writes and measures the quantized layout" in stderr
    if not torch.cuda.is_available():
        code, stderr, _ = compress(config, "prune-0", "--device", "cuda")
        assert code == 2 and "sees no CUDA GPU" in stderr, stderr[-2000:]
    assert not (tmp_path / "output" / "compressed").exists()
