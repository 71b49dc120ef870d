"""One compression stage end to end: produce the model, measure it against the original, commit.

    load the trained model -> quantise | prune (+ recovery) | distil -> write the stage directory
    (weights, config, tokenizer, compression.json) -> load it back and measure it beside the
    original -> report.json -> rename into place

A stage whose directory already holds a report with the same fingerprint (the stage's spec, the
training and DeepSpeed settings it uses, and the input model's files) is complete: it is not redone,
so a retried pod converges instead of repeating the work.

With ``spec.storage.remote`` the committed stage directory is then uploaded under
``compressed/<STAGE>/`` (marker last; skipped when the remote copy already matches) and its URI is the
summary's ``modelUri``; an upload that cannot complete fails the stage (train/remote.py).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from pathlib import Path
from typing import Any

import torch

from llmop_contract.api.v1alpha1.lifecycle import Distillation, Pruning, PruningMethod, Quantization
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.remote import COMPRESSED
from llmtrain import energy
from llmtrain.compress import evaluate, layout
from llmtrain.compress.device import resolve_device
from llmtrain.compress.load import load_model
from llmtrain.compress.stages import DEFAULT_INT4_GROUP, ModelShape, Stage
from llmtrain.logs import Logger

CALIBRATION_BATCHES = 8
"""Training micro-batches whose activations rank heads and channels for structured pruning."""


def stage_device(stage: Stage, choice: str) -> torch.device:
    """Where the stage's models run for ``--device choice`` (llmtrain.compress.cli says the rule)."""
    cpu_only = f"{stage.name} writes and measures the quantized layout, which runs on PyTorch's CPU kernels"
    return resolve_device(choice, cpu_only if isinstance(stage.spec, Quantization) else None)


def fingerprint(cfg: TrainerConfig, stage: Stage, source: Path, settings: evaluate.EvalSettings) -> str:
    files = {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(source.iterdir()) if p.is_file()
    }
    identity = {
        "format": layout.FORMAT,
        "stage": stage.name,
        "spec": stage.spec.model_dump(mode="json", by_alias=True),
        "training": cfg.spec.training.model_dump(mode="json", by_alias=True),
        "deepspeed": cfg.spec.deepspeed.model_dump(mode="json", by_alias=True),
        "source": str(source.resolve()),
        "files": files,
        "evaluation": evaluate.settings_dict(settings),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The termination message: exactly stage, method, modelPath and the flat float results."""
    return {k: report[k] for k in ("stage", "method", "modelPath", "results")}


def uploaded(
    cfg: TrainerConfig, stage: Stage, final: Path, out: dict[str, Any], log: Logger
) -> dict[str, Any]:
    """``out`` with modelUri, once the stage's directory is complete under storage.remote (if set)."""
    from llmtrain.train.remote import upload_model

    uri = upload_model(cfg, final, posixpath.join(COMPRESSED, stage.name), log)
    return out if uri is None else {**out, "modelUri": uri}


def run_stage(
    cfg: TrainerConfig, stage: Stage, shape: ModelShape, log: Logger, device: torch.device | None = None
) -> dict[str, Any]:
    """Produce, measure and commit ``stage``; ``device`` (default the CPU) runs recovery and evaluation."""
    from transformers.utils import logging as hf_logging

    device = device or torch.device("cpu")
    started = time.perf_counter()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no tqdm bars amid the JSON log lines
    source = layout.model_dir(cfg.paths.output_dir)
    final = layout.stage_dir(cfg.paths.output_dir, stage.name)
    settings = evaluate.EvalSettings.from_config(cfg, shape.context_length)
    print_fp = fingerprint(cfg, stage, source, settings)
    layout.remove_stale(final)  # temporary directories of a pod that died mid-stage
    existing = layout.read_json(final / layout.REPORT)
    marker = layout.read_marker(final)
    if existing is not None and marker is not None and marker.get("fingerprint") == print_fp:
        log.event("up_to_date", stage=stage.name, model_path=str(final))
        return uploaded(cfg, stage, final, summary(existing), log)

    log.event(
        "start",
        stage=stage.name,
        method=stage.method,
        field=stage.field,
        source=str(source),
        device=str(device),
    )
    meter = StageEnergy.start(device)
    with layout.staging(final) as tmp:
        details = produce(cfg, stage, shape, source, tmp, log, device)
        marker_value = {
            "format": layout.FORMAT,
            "stage": stage.name,
            "method": stage.method,
            "fingerprint": print_fp,
            "source": str(source),
            **details.pop("marker"),
        }
        layout.write_json(tmp / layout.MARKER, marker_value)
        layout.copy_side_files(source, tmp)
        log.event(
            "evaluating", stage=stage.name, batches=settings.max_batches, new_tokens=settings.new_tokens
        )
        # On the one device, so the two figures compare (a quantisation stage's is always the CPU).
        baseline_model, compressed_model = load_model(source, str(device)), load_model(tmp, str(device))
        data = evaluate.load_eval_data(cfg.paths.data_dir, settings, cfg.spec.training.seed)
        base, comp = evaluate.measure_pair((baseline_model, source), (compressed_model, tmp), data, settings)
        results = evaluate.results(base, comp, time.perf_counter() - started)
        results.update({k: float(v) for k, v in details.pop("figures").items()})
        results.update(meter.results())
        report = {
            "stage": stage.name,
            "method": stage.method,
            "field": stage.field,
            "spec": stage.spec.model_dump(mode="json", by_alias=True),
            "modelPath": str(final),
            "sourceModel": str(source),
            "layout": marker_value["layout"],
            "baseline": evaluate.as_dict(base),
            "compressed": evaluate.as_dict(comp),
            "results": results,
            "evaluation": evaluate.settings_dict(settings),
            "details": details,
            "fingerprint": print_fp,
        }
        log.event("writing", stage=stage.name, model_path=str(final))
        layout.write_json(tmp / layout.REPORT, report)
    log.event("done", stage=stage.name, method=stage.method, model_path=str(final), **_short(results))
    return uploaded(cfg, stage, final, summary(report), log)


class StageEnergy:
    """The energy of one stage (producing and evaluating the model) on the device it ran on: NVML
    for a CUDA device, RAPL on the CPU where the kernel exposes it. Unmeasurable: energyMeasured 0
    and no energyJoules, never an estimate."""

    def __init__(self, reader: energy.EnergyReader | None) -> None:
        self.reader = reader

    @classmethod
    def start(cls, device: torch.device) -> StageEnergy:
        cuda = [device.index or 0] if device.type == "cuda" else None
        reader = energy.discover(cuda)
        if reader is not None:
            reader.start()
        return cls(reader)

    def results(self) -> dict[str, float]:
        if self.reader is None:
            return {"energyMeasured": 0.0}
        joules = self.reader.joules()
        self.reader.close()
        return {"energyMeasured": 1.0, "energyJoules": joules}


def _short(results: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in results.items()}


def produce(
    cfg: TrainerConfig,
    stage: Stage,
    shape: ModelShape,
    source: Path,
    tmp: Path,
    log: Logger,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Write the compressed weights and config.json into ``tmp``.

    Returns {"marker": extra marker fields (layout, ...), "figures": float results, ...details}.
    """
    spec = stage.spec
    if isinstance(spec, Quantization):
        return _quantize(spec, shape, source, tmp, log)
    if isinstance(spec, Pruning):
        return _prune(cfg, spec, shape, source, tmp, log, device or torch.device("cpu"))
    assert isinstance(spec, Distillation)
    from llmtrain.compress.distill import distill

    log.event("loading", model=str(source), role="teacher")
    teacher = load_model(source)
    figures = distill(cfg, spec, teacher, shape, tmp, log)
    return {"marker": {"layout": layout.LAYOUT_HF}, "figures": figures}


def _quantize(spec: Quantization, shape: ModelShape, source: Path, tmp: Path, log: Logger) -> dict[str, Any]:
    from safetensors.torch import save_file

    from llmtrain.compress.quantize import quantize_model, tensors_to_save, tied_embeddings

    log.event("loading", model=str(source))
    model: Any = load_model(source)
    group = spec.group_size or DEFAULT_INT4_GROUP
    log.event("quantizing", method=spec.method.value, group_size=group)
    tied = tied_embeddings(model)  # as loaded: some families tie without saying so in config.json
    formats = quantize_model(model, spec.method.value, group, tied)
    fallback = [n for n, m in model.named_modules() if getattr(m, "use_kernel", True) is False]
    if fallback:  # correct but slower: say so where a user looking at the speed will see it
        log.event("quantized_without_kernel", modules=len(fallback), first=fallback[0])
    log.event("quantized", modules=len(formats))
    save_file(tensors_to_save(model, tied), str(tmp / layout.WEIGHTS), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    marker = {"layout": layout.LAYOUT_QUANTIZED, "groupSize": group, "modules": formats}
    return {"marker": marker, "figures": {}, "modulesWithoutKernel": fallback}


def _prune(
    cfg: TrainerConfig,
    spec: Pruning,
    shape: ModelShape,
    source: Path,
    tmp: Path,
    log: Logger,
    device: torch.device,
) -> dict[str, Any]:
    from llmtrain.compress.prune import magnitude_prune, structured_prune
    from llmtrain.compress.recovery import recover, train_loader

    log.event("loading", model=str(source))
    model: Any = load_model(source)
    seq_len = min(cfg.spec.training.sequence_length, shape.context_length)
    masks: dict[str, torch.Tensor] = {}
    details: dict[str, Any] = {}
    log.event("pruning", method=spec.method.value, sparsity=spec.sparsity)
    if spec.method == PruningMethod.MAGNITUDE:
        masks = magnitude_prune(model, spec.sparsity)
    else:
        loader = train_loader(cfg, seq_len)
        try:
            batches = [loader.next()[0] for _ in range(CALIBRATION_BATCHES)]
        finally:
            loader.close()
        model = structured_prune(model, shape, spec.sparsity, batches)
        c = model.config
        details["prunedShape"] = {
            "numHeads": c.num_attention_heads,
            "numKeyValueHeads": c.num_key_value_heads,
            "intermediateSize": c.intermediate_size,
            "headDim": c.head_dim,
        }
        log.event("pruned", **details["prunedShape"])
    figures: dict[str, float] = {"recoverySteps": float(spec.recovery_steps)}
    if spec.recovery_steps:
        # Choosing weights is cheap and stays on the CPU; the recovery training is worth a GPU.
        log.event("recovery_start", steps=spec.recovery_steps, device=str(device))
        model = model.to(device)
        figures["recoveryLoss"] = recover(model, cfg, spec.recovery_steps, masks, log, seq_len)
        model = model.to("cpu")
    model.save_pretrained(tmp)
    return {"marker": {"layout": layout.LAYOUT_HF}, "figures": figures, **details}
