"""The figures every stage reports for the uncompressed model and for its result, measured the same way.

* perplexity: exp of the mean next-token cross-entropy over the same validation windows the trainer
  evaluates (the first ``evaluation.maxBatches`` micro-batches of the val split, ``sequenceLength``);
* size: bytes of the weight files on disk;
* parameters: weights the model represents (a quantised weight counts as one parameter, a tied
  embedding once), so only pruning and distillation change it;
* sparsity: fraction of exactly-zero weights in the decoder's linear layers (embeddings and head excluded);
* tokens/s: greedy ``generate`` of a fixed number of new tokens from a fixed validation prompt on the
  CPU, one thread, after a warm-up run, median over repeats; the two models alternate so drift in
  machine load hits both alike.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmtrain.compress.layout import weights_bytes
from llmtrain.compress.quantize import head_name, is_linear, linear_weight
from llmtrain.compress.quantized import Int4WeightOnlyLinear, Int8Embedding, QuantizedLinear
from llmtrain.train.data import TokenStream, Windows, read_manifest, split_files, validation_batches


@dataclass(frozen=True)
class EvalSettings:
    """How a model is measured; recorded in report.json."""

    sequence_length: int
    """Tokens per validation window (training.sequenceLength)."""
    micro_batch_size: int
    """Windows per validation batch (training.microBatchSize)."""
    max_batches: int
    """Validation batches (training.evaluation.maxBatches)."""
    prompt_tokens: int = 16
    """Length of the generation prompt, the first tokens of the val split."""
    new_tokens: int = 32
    """Tokens generated per timed run (generation never stops early)."""
    repeats: int = 5
    """Timed runs per model after one warm-up; tokens/s is from the median."""
    threads: int = 1
    """Intra-op threads while generating (see tokens_per_second)."""

    @classmethod
    def from_config(cls, cfg: TrainerConfig, context_length: int) -> EvalSettings:
        tr = cfg.spec.training
        prompt = min(16, context_length // 4)
        return cls(
            sequence_length=min(tr.sequence_length, context_length),
            micro_batch_size=tr.micro_batch_size,
            max_batches=tr.evaluation.max_batches,
            prompt_tokens=prompt,
            new_tokens=min(32, context_length - prompt),
        )


@dataclass(frozen=True)
class Measurement:
    """One model's figures."""

    validation_loss: float
    perplexity: float
    size_bytes: int
    parameters: int
    sparsity: float
    tokens_per_second: float


@dataclass
class EvalData:
    batches: list[tuple[Tensor, Tensor]]
    prompt: Tensor


def load_eval_data(data_dir: str | Path, settings: EvalSettings, seed: int) -> EvalData:
    manifest = read_manifest(data_dir)
    stream = TokenStream(split_files(data_dir, manifest, "val"), manifest.dtype)
    windows = Windows(stream, settings.sequence_length, seed)
    batches = validation_batches(windows, settings.micro_batch_size, 0, 1, settings.max_batches)
    prompt = torch.from_numpy(stream.read(0, settings.prompt_tokens)).unsqueeze(0)
    return EvalData([(x, y) for x, y in batches], prompt)


@torch.no_grad()
def validation_loss(model: Any, batches: list[tuple[Tensor, Tensor]]) -> float:
    """Mean next-token loss; the (CPU) batches go to the model's device (``--device``)."""
    device = next(model.parameters()).device
    total = 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(input_ids=x).logits
        total += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1)))
    return total / len(batches)


def count_parameters(model: nn.Module) -> int:
    """Weights represented, each tensor once (a tied head shares the embedding's)."""
    seen: dict[int, int] = {p.data_ptr(): p.numel() for p in model.parameters()}
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, Int8Embedding)):
            q = module.qweight  # two int4 values per byte
            seen[q.data_ptr()] = q.numel() * (2 if isinstance(module, Int4WeightOnlyLinear) else 1)
    return sum(seen.values())


@torch.no_grad()
def linear_sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over the decoder's linear layers (not the embedding or the head)."""
    zeros = total = 0
    head = head_name(model)
    for name, module in model.named_modules():
        if name == head:
            continue
        weight: Tensor | None = None
        if isinstance(module, QuantizedLinear):
            weight = module.dequantized_weight()
        elif is_linear(module):  # nn.Linear, or GPT-2's Conv1D
            weight = linear_weight(module)
        if weight is not None:
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total if total else 0.0


@torch.no_grad()
def _generate_seconds(model: Any, prompt: Tensor, new_tokens: int) -> float:
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    _synchronize(device)
    started = time.perf_counter()
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
    )
    _synchronize(device)  # CUDA kernels run asynchronously: the time is theirs only once they finish
    seconds = time.perf_counter() - started
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tokens_per_second(models: list[Any], prompt: Tensor, settings: EvalSettings) -> list[float]:
    """Greedy generation speed of each model: warm-up, then ``repeats`` alternating timed runs.

    On ``settings.threads`` intra-op threads: a decoding step is a chain of small matrix-vector
    products, and split across threads each one waits for the slowest; when another process holds a
    core (a shared node, or a pod whose CPU limit is below the node's core count, which torch does not
    see) that wait dominates and the figures swing several-fold between runs. One thread gives a
    per-core figure that is comparable between models, runs and nodes.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        for model in models:
            _generate_seconds(model, prompt, settings.new_tokens)
        times: list[list[float]] = [[] for _ in models]
        for _ in range(settings.repeats):
            for i, model in enumerate(models):
                times[i].append(_generate_seconds(model, prompt, settings.new_tokens))
    finally:
        torch.set_num_threads(previous)
    return [settings.new_tokens / statistics.median(t) for t in times]


def measure_pair(
    baseline: tuple[Any, Path], compressed: tuple[Any, Path], data: EvalData, settings: EvalSettings
) -> tuple[Measurement, Measurement]:
    """Measure the uncompressed and the compressed model (each: loaded model, its directory)."""
    speeds = tokens_per_second([baseline[0], compressed[0]], data.prompt, settings)
    out = []
    for (model, path), speed in zip((baseline, compressed), speeds, strict=True):
        loss = validation_loss(model, data.batches)
        out.append(
            Measurement(
                validation_loss=loss,
                perplexity=math.exp(min(loss, 50.0)),
                size_bytes=weights_bytes(path),
                parameters=count_parameters(model),
                sparsity=linear_sparsity(model),
                tokens_per_second=speed,
            )
        )
    return out[0], out[1]


def results(baseline: Measurement, compressed: Measurement, seconds: float) -> dict[str, float]:
    """The flat camelCase figures of the termination message and the operator's status (floats only)."""
    return {
        "perplexity": compressed.perplexity,
        "baselinePerplexity": baseline.perplexity,
        "perplexityIncreasePercent": 100.0 * (compressed.perplexity / baseline.perplexity - 1.0),
        "validationLoss": compressed.validation_loss,
        "baselineValidationLoss": baseline.validation_loss,
        "sizeBytes": float(compressed.size_bytes),
        "baselineSizeBytes": float(baseline.size_bytes),
        "sizeRatio": compressed.size_bytes / baseline.size_bytes,
        "parameters": float(compressed.parameters),
        "baselineParameters": float(baseline.parameters),
        "parameterRatio": compressed.parameters / baseline.parameters,
        "sparsity": compressed.sparsity,
        "baselineSparsity": baseline.sparsity,
        "tokensPerSecond": compressed.tokens_per_second,
        "baselineTokensPerSecond": baseline.tokens_per_second,
        "speedup": compressed.tokens_per_second / baseline.tokens_per_second,
        "seconds": seconds,
    }


def as_dict(m: Measurement) -> dict[str, Any]:
    return {_camel(k): v for k, v in asdict(m).items()}


def settings_dict(s: EvalSettings) -> dict[str, Any]:
    return {_camel(k): v for k, v in asdict(s).items()}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
