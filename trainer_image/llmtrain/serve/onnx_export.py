"""Export a model directory to ONNX and check it against PyTorch with onnxruntime.

The graph maps ``(input_ids, attention_mask)`` (int64, [batch, sequence], both dimensions dynamic,
left padding allowed) to ``logits`` (float, [batch, sequence, vocab]); position ids are derived from
the mask inside the graph, as the server does. It has no KV-cache inputs: a consumer re-runs the whole
sequence per generated token, which is what edge runtimes with small models usually do.

Export goes through the maintained exporter, ``torch.onnx.export(dynamo=True)`` (torch.export +
onnxscript). Only if that raises does it fall back to the TorchScript exporter, and the report says so
and why. Either graph must match PyTorch's logits on the sample inputs within the tolerance.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmtrain.compress.load import load_model, load_tokenizer
from llmtrain.serve import loader

ONNX_FILE = "model.onnx"
REPORT_FILE = "report.json"
INPUTS = ("input_ids", "attention_mask")
SAMPLE_TEXTS = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy",
    "The licence",
    "x",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class LogitsGraph(nn.Module):
    """The causal LM as a pure function of ids and mask: no cache, positions from the mask."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
        )
        logits: Tensor = out.logits
        return logits


@dataclass
class Sample:
    batch: int
    sequence: int
    padded: bool
    max_abs_diff: float = 0.0


@dataclass
class ExportReport:
    model_dir: str
    onnx_path: str
    exporter: str
    opset: int
    """The default ONNX domain's opset in the written graph."""
    tolerance: float
    max_abs_diff: float = 0.0
    passed: bool = False
    size_bytes: int = 0
    seconds: float = 0.0
    fallback_reason: str | None = None
    dequantized_layers: int = 0  # quantised linears exported with their dequantised float weights
    samples: list[Sample] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sample_inputs(
    tokenizer: Any, vocab_size: int, context_length: int, pad_id: int
) -> list[tuple[Tensor, Tensor]]:
    """Real text (left-padded batch), one token, and random ids filling the whole context."""
    texts = [tokenizer.encode(t)[: context_length // 2] for t in SAMPLE_TEXTS]
    width = max(len(t) for t in texts)
    padded = torch.tensor([[pad_id] * (width - len(t)) + t for t in texts])
    padded_mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in texts])
    gen = torch.Generator().manual_seed(0)
    full = torch.randint(0, vocab_size, (2, context_length), generator=gen)
    one = full[:1, :1]
    return [(padded, padded_mask), (one, torch.ones_like(one)), (full, torch.ones_like(full))]


def _export(
    graph: LogitsGraph, example: tuple[Tensor, Tensor], path: Path, opset: int | None, context_length: int
) -> tuple[str, str | None]:
    """Write the graph to ``path``; returns (exporter used, why the maintained one was not used)."""
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=context_length)
    try:
        program = torch.onnx.export(
            graph,
            example,
            dynamo=True,
            input_names=list(INPUTS),
            output_names=["logits"],
            dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUTS},
            opset_version=opset,
        )
        assert program is not None
        program.save(str(path))  # initializers go to model.onnx.data only past protobuf's 2 GB
        return "torch.onnx.export(dynamo=True)", None
    except Exception as exc:  # the maintained path failed: say why, then try the TorchScript exporter
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    axes = {"batch": 0, "sequence": 1}
    torch.onnx.export(
        graph,
        example,
        str(path),
        dynamo=False,
        input_names=list(INPUTS),
        output_names=["logits"],
        dynamic_axes={name: {i: n for n, i in axes.items()} for name in (*INPUTS, "logits")},
        opset_version=opset,
    )
    return "torch.onnx.export(dynamo=False)", reason


def _max_abs_diff(session: Any, graph: LogitsGraph, ids: Tensor, mask: Tensor) -> float:
    """Largest |PyTorch - onnxruntime| over the logits of real (unmasked) positions.

    Padding positions attend to nothing; their logits are arbitrary in both runtimes and never used.
    """
    with torch.inference_mode():
        expected = graph(ids, mask).float()
    (actual,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    diff = (expected - torch.from_numpy(actual).float()).abs()[mask.bool()]
    return float(diff.max())


def dequantize(model: nn.Module) -> int:
    """Swap quantised linears for float ones holding the same (dequantised) weights; returns how many.

    ONNX has no counterpart of PyTorch's int8/int4 weight-packed matmul kernels, so a quantised model
    is exported with the very weights it computes with, as float; the graph checked against it is
    this float model. (onnxruntime's own quantisation can shrink the file again; not done here.)
    """
    from llmtrain.compress.quantized import QuantizedLinear

    names = [name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = getattr(parent, child)
        linear = nn.Linear(quantized.in_features, quantized.out_features, bias=False)
        linear.weight = nn.Parameter(quantized.dequantized_weight().float(), requires_grad=False)
        setattr(parent, child, linear)
    return len(names)


def _copy_side_files(source: Path, dest: Path) -> None:
    """Tokenizer, config and generation files: what a consumer needs beside the graph."""
    for item in sorted(source.iterdir()):
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name != REPORT_FILE:
            shutil.copy2(item, dest / item.name)


def export_onnx(
    model_dir: str | Path, out_dir: str | Path, tolerance: float = 1e-3, opset: int | None = None
) -> ExportReport:
    """Export, verify and write ``out_dir`` (replaced atomically); ``passed`` says if it matched."""
    import onnx
    import onnxruntime  # type: ignore[import-untyped]

    from llmtrain.compress.layout import write_json

    start = time.monotonic()
    source, out = Path(model_dir), Path(out_dir)
    model = load_model(source)
    dequantized = dequantize(model)
    model = model.float()
    tokenizer = load_tokenizer(source)
    config: Any = getattr(model, "config", None)
    context_length = loader.context_length(config, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    graph = LogitsGraph(model).eval()
    samples = sample_inputs(tokenizer, int(config.vocab_size), context_length, pad_id)

    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    exporter, reason = _export(graph, samples[0], tmp / ONNX_FILE, opset, context_length)
    session = onnxruntime.InferenceSession(str(tmp / ONNX_FILE), providers=["CPUExecutionProvider"])
    header = onnx.load(str(tmp / ONNX_FILE), load_external_data=False)
    report = ExportReport(
        model_dir=str(source),
        onnx_path=str(out / ONNX_FILE),
        exporter=exporter,
        opset=next(o.version for o in header.opset_import if o.domain in ("", "ai.onnx")),
        tolerance=tolerance,
        fallback_reason=reason,
        dequantized_layers=dequantized,
    )
    for ids, mask in samples:
        diff = _max_abs_diff(session, graph, ids, mask)
        report.samples.append(Sample(int(ids.shape[0]), int(ids.shape[1]), bool((mask == 0).any()), diff))
    report.max_abs_diff = max(s.max_abs_diff for s in report.samples)
    report.passed = report.max_abs_diff <= tolerance
    report.size_bytes = sum(p.stat().st_size for p in tmp.glob(ONNX_FILE + "*"))
    _copy_side_files(source, tmp)
    report.seconds = time.monotonic() - start
    write_json(tmp / REPORT_FILE, report.to_json())
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, out)
    return report
