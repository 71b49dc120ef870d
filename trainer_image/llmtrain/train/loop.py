"""The training loop. Everything it needs is built in ``setup``; each concern lives in its own module."""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.deepspeed import gradient_accumulation_steps
from llmop_contract.protocol import DataManifest, Env, ExitCode, TerminationMessage
from llmtrain import termination
from llmtrain.adapt import llama_args
from llmtrain.datacheck import check_training_data
from llmtrain.logs import Logger
from llmtrain.model import hf
from llmtrain.model.args import LlamaArgs
from llmtrain.model.llama import Llama, build_model
from llmtrain.train import dist, pipeline, sequence_parallel, sparsity
from llmtrain.train.cadence import Cadence
from llmtrain.train.checkpoint import Checkpointer, Restored
from llmtrain.train.data import (
    Batch,
    Position,
    Records,
    TrainLoader,
    Windows,
    open_split,
    read_manifest,
    validation_batches,
)
from llmtrain.train.energy import RunEnergy
from llmtrain.train.engine import deepspeed_config, initialize, set_learning_rate
from llmtrain.train.export import (
    export_model,
    export_pretrained_full,
    export_pretrained_lora,
    full_state_dict,
    trainable_state_dict,
)
from llmtrain.train.memory import local_parameter_bytes, optimizer_state_bytes
from llmtrain.train.mesh import Mesh
from llmtrain.train.metrics import (
    Metrics,
    Throughput,
    current_rss_bytes,
    flops_per_token,
    memory_bytes,
    transformer_flops_per_token,
)
from llmtrain.train.schedule import learning_rate, total_steps
from llmtrain.world import at_world, check_world

EXIT_OK = ExitCode.OK
EXIT_PREEMPTED = ExitCode.PREEMPTED
EXPORT_PROBE = "LLMTRAIN_EXPORT_PROBE"
"""If set, a file where rank 0 writes the first validation micro-batch and the trained model's logits
on it right before export: what a check that the export reproduces the trainer's model compares with."""


@dataclass
class Result:
    exit_code: int
    step: int
    total_steps: int
    resumed_from: str | None = None
    checkpoint_fallbacks: int = 0
    validation_loss: float | None = None
    loss: float | None = None  # training loss at the last logged step
    export_dir: str | None = None
    step_seconds: list[float] = field(default_factory=list)


class Preemption:
    """SIGTERM sets a flag; the loop checkpoints at the next step boundary and exits 75."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


@dataclass
class Run:
    cfg: TrainerConfig
    env: dist.DistEnv
    log: Logger
    model: nn.Module
    """The module DeepSpeed trains: the scratch Llama, or a pretrained model behind hf.CausalLM."""
    model_args: LlamaArgs | None
    """The from-scratch shape; None for a pretrained model."""
    pretrained: hf.Pretrained | None
    engine: Any
    checkpointer: Checkpointer
    loader: TrainLoader
    val_batches: list[Batch]
    metrics: Metrics
    throughput: Throughput
    total_steps: int
    step: int
    resumed_from: str | None
    logged_step: int = 0
    checkpoint_fallbacks: int = 0
    energy: RunEnergy | None = None
    productive_seconds: float = 0.0
    """Seconds of the steps kept so far: the checkpoint's figure (steps up to it) plus this attempt's."""
    mesh: Mesh | None = None
    sequence: sequence_parallel.SequenceGroups | None = None
    """Ulysses' groups when parallelism.sequence > 1: every batch is sliced along the sequence."""
    restored_from: str | None = None
    """Where this attempt's checkpoint was fetched from (storage.remote or resumeFrom); None: the volume."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _windows(cfg: TrainerConfig, manifest: DataManifest, split: str) -> Windows | Records:
    """Text or Packed windows, or Padded records, as the manifest's format says."""
    tr = cfg.spec.training
    return open_split(cfg.paths.data_dir, manifest, split, tr.sequence_length, tr.seed)


def _model(cfg: TrainerConfig, model_args: LlamaArgs) -> Llama:
    tr = cfg.spec.training
    model = build_model(
        model_args,
        seed=tr.seed,
        dropout=tr.regularization.dropout,
        sparse=tr.sparsity.enabled,
        activation_checkpointing=tr.activation_checkpointing,
    )
    model.set_penalty(tr.regularization.l1, tr.regularization.l2)
    return model


def _model_dir(cfg: TrainerConfig) -> Path:
    """The pretrained model's local directory (fetched first when remote)."""
    from llmtrain.sources import resolve_model

    return resolve_model(cfg)


def setup(cfg: TrainerConfig) -> Run:
    env = dist.setup()
    log = Logger(env.rank)
    spec, tr = cfg.spec, cfg.spec.training
    check_world(cfg, env.world_size)
    # Also checked by `llmtrain train` before the launcher; again here for ranks started directly,
    # and for the world actually running (an elastic gang's current size).
    manifest = check_training_data(at_world(cfg, env.world_size))
    # Per-rank seed: dropout masks differ across data-parallel ranks; init uses its own generator.
    seed_everything(tr.seed + env.rank)
    ds_config = deepspeed_config(cfg, env.world_size)  # its accumulation fitted to this world
    mesh = Mesh.of(spec.parallelism, env)
    rss_before = current_rss_bytes()
    model_args: LlamaArgs | None = None
    pretrained: hf.Pretrained | None = None
    sequence: sequence_parallel.SequenceGroups | None = None
    model: nn.Module
    if spec.model.pretrained is not None:
        pretrained = hf.load(cfg, ds_config, _model_dir(cfg), env.local_rank)
        hf.check_vocabulary(pretrained.architecture, manifest.vocab_size)
        arch = pretrained.architecture
        model, parameters, trainable = pretrained.module, arch.parameters, arch.trainable
        flops = transformer_flops_per_token(
            arch.parameters, arch.layers, arch.heads, arch.head_dim, tr.sequence_length, arch.trainable
        )
    else:
        model_args = llama_args(spec.model)
        model = _model(cfg, model_args)
        parameters = trainable = model_args.num_parameters()
        flops = flops_per_token(model_args, tr.sequence_length)
        if mesh.pipeline > 1:
            # Built whole from the seed (a data-parallel run's exact weights); each rank keeps its stage.
            model = pipeline.build(model, mesh.pipeline)
        if spec.parallelism.sequence > 1:
            # Ulysses: each rank of a sequence group attends over its slice of every sequence.
            sequence = sequence_parallel.SequenceGroups.build(spec.parallelism.sequence)
            model = sequence_parallel.wrap(cast(Llama, model), sequence)
    # The mesh's process groups as DeepSpeed's mpu: the sequence groups make it reduce gradients over
    # the sequence and data ranks together; AutoTP's groups make it count replicas.
    engine = initialize(model, cfg, log, ds_config, sequence if sequence is not None else mesh.groups())
    skip_identity_allreduce(engine, env, spec.deepspeed.zero_stage)
    log.event(
        "model_loaded",
        source=str(pretrained.source_dir) if pretrained else "scratch",
        family=pretrained.architecture.family if pretrained else "llama",
        method=tr.method.value,
        parameters=parameters,
        trainable_parameters=trainable,
        # What building and sharding the model cost this rank (ZeRO-3: a part of the model only).
        rss_before_bytes=rss_before,
        peak_rss_bytes=memory_bytes(),
        local_parameter_bytes=local_parameter_bytes(model),
    )
    checkpointer = Checkpointer.for_config(cfg, env)  # with storage.remote: uploads, remote restore
    restored = checkpointer.restore(engine)
    report_restore(log, restored, checkpointer)
    state = restored.client or {}
    position = Position(**state.get("data", {}))
    saved_world = int(state.get("world_size", env.world_size))  # absent: written before it was recorded
    # The data position counts micro-batches of the data-parallel replicas (absent: pure data parallel).
    saved_replicas = int(state.get("data_parallel_size", saved_world))
    if saved_replicas != mesh.data_size:
        position = position.at_world(tr.micro_batch_size, saved_replicas, mesh.data_size)
    # Split by replica, not by rank: every process of one model replica trains on the same samples.
    loader = TrainLoader(
        _windows(cfg, manifest, "train"), tr.micro_batch_size, mesh.data_rank, mesh.data_size, position
    )
    val = validation_batches(
        _windows(cfg, manifest, "val"),
        tr.micro_batch_size,
        mesh.data_rank,
        mesh.data_size,
        tr.evaluation.max_batches,
    )
    throughput = Throughput(
        tokens_per_step=tr.global_batch_size * tr.sequence_length,
        samples_per_step=tr.global_batch_size,
        flops_per_token=flops,
        world=env.world_size,
    )
    metrics = Metrics(with_mfu=throughput.peak_total is not None)
    bubble = pipeline.bubble_fraction(mesh.pipeline, gradient_accumulation_steps(spec, env.world_size))
    metrics.pipeline_bubble.set(bubble if mesh.pipeline > 1 else 0.0)
    checkpointer.register_metrics(metrics.registry)
    total = total_steps(tr)
    metrics.total_steps.set(total)
    step = int(state.get("step", 0))
    metrics.step.set(step)
    # Before the endpoint opens: a scrape must never see the fallbacks without the step they led to.
    metrics.checkpoint_fallbacks.set(restored.fallbacks)
    metrics.resumed_from_step.set(restored.step)
    if env.is_main:
        port = int(os.environ.get(Env.METRICS_PORT, spec.workers.metrics_port))
        log.event("metrics_listening", port=metrics.serve(port))
    log.event(
        "start",
        job=cfg.run.job_name,
        attempt=cfg.run.attempt,
        world_size=env.world_size,
        parameters=parameters,
        trainable_parameters=trainable,
        method=tr.method.value,
        total_steps=total,
        gradient_accumulation=gradient_accumulation_steps(spec, env.world_size),
        # What DeepSpeed trains with: globalBatchSize at every size of an elastic gang.
        global_batch_size=int(engine.train_batch_size()),
        zero_stage=spec.deepspeed.zero_stage,
        mesh=mesh.describe(),
        # 1F1B's idle share per stage at this accumulation: (stages - 1) / (micro-batches + stages - 1).
        pipeline_bubble=round(bubble, 4) if mesh.pipeline > 1 else None,
        precision=tr.precision.value,
        resumed_from=state.get("tag"),
        checkpoint_fallbacks=restored.fallbacks,
        data_position=f"{position.epoch}:{position.batch}",
        saved_world_size=saved_world if state else None,
    )
    metrics.tokens.inc(step * throughput.tokens_per_step)
    energy = RunEnergy(env, resumed=bool(state), before=state.get("energy_joules"))
    log.event("energy_source", source=energy.source or "unavailable", resumed_with_joules=energy.before)
    return Run(
        cfg,
        env,
        log,
        model,
        model_args,
        pretrained,
        engine,
        checkpointer,
        loader,
        val,
        metrics,
        throughput,
        total,
        step,
        state.get("tag"),
        step,
        restored.fallbacks,
        energy,
        float(state.get("productive_seconds") or 0.0),
        mesh,
        sequence,
        restored_from=restored.from_remote,
    )


def skip_identity_allreduce(engine: Any, env: dist.DistEnv, zero_stage: int) -> None:
    """No gradient all-reduce in a world of one at ZeRO-0, where averaging over one rank is the identity.

    DeepSpeed still pays for it every step otherwise: it flattens every gradient into one buffer,
    all-reduces that through gloo (a hand-off to gloo's TCP threads, which on a busy CPU node wait for a
    core) and copies it back. ``enable_backward_allreduce`` is DeepSpeed's own switch for this (it turns
    it off itself without a process group, and its PipelineEngine does its own reduction); ZeRO 1-3
    keep it, since there the same call also moves the gradients into their partitions.
    """
    if env.world_size == 1 and zero_stage == 0:
        engine.enable_backward_allreduce = False


def report_restore(log: Logger, restored: Restored, checkpointer: Checkpointer) -> None:
    """One WARNING line per rejected checkpoint, and one more when none was left to resume from."""
    for problem, kept_as in restored.rejected:
        log.warning(
            "checkpoint_rejected",
            checkpoint=problem.checkpoint.name,
            file=problem.file or "",
            reason=problem.reason,
            detail=problem.detail,
            kept_as=str(kept_as),
            message=f"checkpoint rejected, kept as {kept_as.name}: {problem}",
        )
    if restored.rejected and restored.client is None:
        log.warning(
            "checkpoint_none_valid",
            rejected=len(restored.rejected),
            checkpoint_dir=str(checkpointer.root),
            message="no checkpoint passed verification: training starts from scratch at step 0",
        )


def run(cfg: TrainerConfig) -> Result:
    r = setup(cfg)
    tr, engine, env = cfg.spec.training, r.engine, r.env
    gas, dev = gradient_accumulation_steps(cfg.spec, env.world_size), engine.device
    preemption = Preemption()
    result = Result(
        EXIT_OK,
        r.step,
        r.total_steps,
        resumed_from=r.resumed_from,
        checkpoint_fallbacks=r.checkpoint_fallbacks,
    )
    resumed_from_step = r.step
    r.throughput.mark(r.step, time.perf_counter())
    if r.energy is not None:
        r.energy.start()
    step = r.step
    cadence = Cadence(tr.checkpointing, devices=env.world_size)
    cadence.start(step)
    since_save = 0  # index into result.step_seconds of the first step after the last save
    # Pipeline parallel: DeepSpeed's 1F1B schedule pulls its gas micro-batches itself.
    staged = pipeline.micro_batches(r.loader, dev) if r.mesh is not None and r.mesh.pipeline > 1 else None
    try:
        if step == 0:  # the baseline every later validation loss is compared with
            result.validation_loss = evaluate(r, 0)
        while step < r.total_steps:
            lr = learning_rate(step, r.total_steps, tr.optimizer.learning_rate, tr.lr_schedule)
            set_learning_rate(engine, lr)
            started = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
            if staged is not None:
                loss_sum += pipeline.train_step(engine, staged) * gas
            for _ in range(gas if staged is None else 0):
                b = r.loader.next().to(dev, non_blocking=True)
                if r.sequence is None:
                    loss, penalty = engine(b.inputs, b.targets, b.positions)
                    engine.backward(loss + penalty)
                    loss_sum += loss.detach().float()
                else:
                    seq = r.sequence
                    inputs, targets = (
                        sequence_parallel.local(b.inputs, seq),
                        sequence_parallel.local(b.targets, seq),
                    )
                    loss, penalty = engine(inputs, targets, None)
                    # DeepSpeed sums gradients over the sequence ranks: each backpropagates its share.
                    engine.backward(sequence_parallel.scale_loss(loss + penalty, seq))
                    loss_sum += sequence_parallel.full_loss(loss, seq).float()
                engine.step()  # DeepSpeed only updates at the accumulation boundary
            step += 1
            if step == resumed_from_step + 1:  # the optimizer state exists from the first step on
                report_memory(r)
            result.step_seconds.append(time.perf_counter() - started)
            r.productive_seconds += result.step_seconds[-1]
            if sparsity.due(step, tr.sparsity):
                target = sparsity.target_sparsity(step, tr.sparsity)
                sparsity.update_masks(cast(Llama, r.model), target, zero3=cfg.spec.deepspeed.zero_stage == 3)
                r.metrics.sparsity.set(sparsity.measured_sparsity(cast(Llama, r.model)))
            if step % tr.log_interval_steps == 0 or step == r.total_steps:
                result.loss = report_progress(r, step, float(loss_sum.item()) / gas, lr)
            if step % tr.evaluation.interval_steps == 0 or step == r.total_steps:
                result.validation_loss = evaluate(r, step)
            stop = dist.any_rank(preemption.requested, env)
            if stop or cadence.due(step) or step == r.total_steps:
                seconds = save_checkpoint(r, step)
                recent = result.step_seconds[since_save:]
                since_save = len(result.step_seconds)
                if (steps := cadence.saved(step, seconds, sum(recent) / max(1, len(recent)))) is not None:
                    r.log.event(
                        "checkpoint_interval", step=step, next_in_steps=steps, save_seconds=round(seconds, 3)
                    )
            if stop:
                r.log.event("preempted", step=step, checkpoint=str(r.checkpointer.root))
                write_status(env, f"preempted step={step}")
                result.exit_code, result.step = EXIT_PREEMPTED, step
                return result
        result.step = step
        result.export_dir = export(r)
        model_uri = r.checkpointer.finish(cfg.paths.output_dir)  # uploads done, or it raises
        r.log.event("done", step=step, validation_loss=result.validation_loss, export_dir=result.export_dir)
        final = final_results(r, step)  # a collective (the energy sum): every rank, before rank 0 writes
        if env.is_main:
            # The operator copies these final figures into the job's status (HPO reads its objective).
            termination.write(
                TerminationMessage(
                    step=step,
                    total_steps=r.total_steps,
                    loss=result.loss,
                    validation_loss=result.validation_loss,
                    validation_step=step,
                    model_path=result.export_dir,
                    model_uri=model_uri,
                    results=final,
                    # How this attempt resumed, as the metrics say it live: an attempt that ends between
                    # two of the operator's scrapes is reported from here (status.resume, its Events).
                    resumed_from_step=resumed_from_step,
                    checkpoint_fallbacks=result.checkpoint_fallbacks,
                    resumed_from_remote=r.restored_from is not None,
                    extra={"stage": "train"},
                )
            )
        return result
    finally:
        r.loader.close()
        if r.energy is not None:
            r.energy.close()


def report_memory(r: Run) -> None:
    """Rank 0's share of the model and of the optimizer state, measured on the tensors it holds."""
    params = local_parameter_bytes(r.model)
    optimizer = optimizer_state_bytes(r.engine, r.model)
    r.metrics.parameter_bytes.set(params)
    if optimizer is not None:
        r.metrics.optimizer_state_bytes.set(optimizer)
    r.log.event(
        "memory", local_parameter_bytes=params, optimizer_state_bytes=optimizer, peak_rss_bytes=memory_bytes()
    )


def report_progress(r: Run, step: int, local_loss: float, lr: float) -> float:
    loss = dist.mean_over_ranks(local_loss, r.env)
    rates = r.throughput.rates(step, time.perf_counter(), r.total_steps)
    m = r.metrics
    m.tokens.inc(r.throughput.tokens_per_step * (step - r.logged_step))
    r.logged_step = step
    m.step.set(step)
    m.loss.set(loss)
    m.lr.set(lr)
    m.tokens_per_second.set(rates["tokens_per_second"])
    m.samples_per_second.set(rates["samples_per_second"])
    m.eta.set(rates["eta_seconds"])
    m.memory.set(memory_bytes())
    if m.mfu is not None and m.flops_per_second is not None:
        m.flops_per_second.set(rates["flops_per_second"])
        m.mfu.set(rates["mfu"])
    figures = energy_figures(r, step)
    m.productive_seconds.set(r.productive_seconds)
    r.log.event(
        "progress",
        step=step,
        total_steps=r.total_steps,
        loss=round(loss, 6),
        lr=lr,
        **_rounded(rates),
        productive_seconds=round(r.productive_seconds, 3),
        **figures,
    )
    return loss


def final_results(r: Run, step: int) -> dict[str, float]:
    """Goodput and energy inputs for the job's final status (the last scrape may predate them)."""
    out = {"productiveSeconds": round(r.productive_seconds, 3)}
    joules = r.energy.total() if r.energy is not None else None
    if joules is not None:
        out["energyJoules"] = round(joules, 3)
        out["joulesPerToken"] = joules / max(1, step * r.throughput.tokens_per_step)
    return out


def energy_figures(r: Run, step: int) -> dict[str, float]:
    """Energy so far and per trained token, into the metrics; {} (and the gauges unset) when unmeasurable."""
    joules = r.energy.total() if r.energy is not None else None  # a collective: every rank is here
    r.metrics.energy_available.set(0 if joules is None else 1)
    if joules is None:
        return {}
    per_token = joules / max(1, step * r.throughput.tokens_per_step)
    r.metrics.energy_joules.set(joules)
    r.metrics.joules_per_token.set(per_token)
    return {"energy_joules": round(joules, 3), "joules_per_token": per_token}


def _rounded(rates: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4 if k == "mfu" else 1) for k, v in rates.items()}


@torch.no_grad()
def evaluate(r: Run, step: int) -> float:
    r.engine.eval()
    if r.mesh is not None and r.mesh.pipeline > 1:
        local = pipeline.evaluate(r.engine, r.val_batches)  # the last stage's, on every stage
    else:
        total = 0.0
        for batch in r.val_batches:
            b = batch.to(r.engine.device)
            if r.sequence is None:
                loss, _ = r.engine(b.inputs, b.targets, b.positions)
            else:
                seq = r.sequence
                sliced = sequence_parallel.local(b.inputs, seq), sequence_parallel.local(b.targets, seq)
                loss = sequence_parallel.full_loss(r.engine(*sliced, None)[0], seq)
            total += float(loss.item())
        local = total / len(r.val_batches)
    r.engine.train()
    val_loss = dist.mean_over_ranks(local, r.env)
    perplexity = float(np.exp(min(val_loss, 50.0)))
    r.metrics.val_loss.set(val_loss)
    r.metrics.val_ppl.set(perplexity)
    r.metrics.val_step.set(step)
    r.log.event("validation", step=step, validation_loss=round(val_loss, 6), perplexity=round(perplexity, 3))
    return val_loss


def save_checkpoint(r: Run, step: int) -> float:
    client = {
        "step": step,
        "data": r.loader.state(),
        "world_size": r.env.world_size,
        # What the data position counts in (see Position.at_world): micro-batches of this many replicas.
        "data_parallel_size": r.mesh.data_size if r.mesh is not None else r.env.world_size,
        "tensor_parallel_size": r.mesh.tensor if r.mesh is not None else 1,
        "config_seed": r.cfg.spec.training.seed,
        # The job's energy up to this checkpoint, for the attempt that resumes from it (None: unmeasured).
        "energy_joules": r.energy.total() if r.energy is not None else None,
        # Steps after this checkpoint are recomputed by a resumed attempt: only time up to it counts.
        "productive_seconds": r.productive_seconds,
    }
    seconds = r.checkpointer.save(r.engine, step, client)
    r.metrics.checkpoint_seconds.set(seconds)
    r.log.event("checkpoint", step=step, seconds=round(seconds, 3))
    return seconds


def export(r: Run) -> str | None:
    probe = os.environ.get(EXPORT_PROBE)
    # One stage's forward, or one sequence slice's, is no model's logits: no probe then.
    if probe and (r.mesh is None or r.mesh.pipeline == 1) and r.sequence is None:
        write_probe(r, Path(probe))
    out = export_pretrained(r) if r.pretrained is not None else export_scratch(r)
    dist.barrier(r.env)
    return out


def export_scratch(r: Run) -> str | None:
    assert r.model_args is not None
    if r.mesh is not None and r.mesh.pipeline > 1:
        state = pipeline.llama_state_dict(r.engine)  # every stage's layers, in the Llama's names
    else:
        state = full_state_dict(r.engine, r.cfg.spec.deepspeed.zero_stage)
    if state is None:
        return None
    data_dir = r.cfg.paths.data_dir
    out = export_model(
        state, r.model_args, read_manifest(data_dir), data_dir, Path(r.cfg.paths.output_dir) / "model"
    )
    return str(out)


def tokenizer_dir(r: Run) -> Path:
    """The tokenizer the data was prepared with (saved in the data dir), else the model's own."""
    data_dir = Path(r.cfg.paths.data_dir)
    if (data_dir / "tokenizer_config.json").is_file():
        return data_dir
    from llmtrain.sources import resolve_tokenizer

    return resolve_tokenizer(r.cfg)


def export_pretrained(r: Run) -> str | None:
    """model/ (merged, Hugging Face layout) and, with adapters, adapter/ (peft format): rank 0 writes."""
    pre, zero = r.pretrained, r.cfg.spec.deepspeed.zero_stage
    assert pre is not None
    out = Path(r.cfg.paths.output_dir)
    if pre.peft:
        adapters = trainable_state_dict(r.engine, zero)  # a collective: every rank gathers
        if adapters is None:
            return None
        dtype = next(iter(adapters.values())).dtype
        model_dir, adapter_dir = export_pretrained_lora(
            adapters, pre, dtype, tokenizer_dir(r), out / "model", out / "adapter"
        )
        r.log.event("adapter_exported", adapter_dir=str(adapter_dir), tensors=len(adapters))
        return str(model_dir)
    # Gathered all at once (full_state_dict): the one-tensor-at-a-time gather (gathered_state_dict)
    # hung after training at ZeRO-3 in testing, so it is not used yet.
    state = full_state_dict(r.engine, zero)
    if state is None:
        return None
    return str(export_pretrained_full(state, pre, tokenizer_dir(r), out / "model"))


@torch.no_grad()
def write_probe(r: Run, path: Path) -> None:
    """The first validation micro-batch and the engine's logits on it (every rank runs the forward)."""
    r.engine.eval()
    b = r.val_batches[0].to(r.engine.device)
    logits, _ = r.engine(b.inputs, None, b.positions)
    r.engine.train()
    if r.env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        positions = None if b.positions is None else b.positions.cpu()
        torch.save({"inputs": b.inputs.cpu(), "positions": positions, "logits": logits.float().cpu()}, path)


def write_status(env: dist.DistEnv, text: str) -> None:
    """Tell a wrapping ``llmtrain train`` launcher (see launch.py) why the workers stopped."""
    path = os.environ.get(Env.STATUS_FILE)
    if path and env.is_main:
        Path(path).write_text(text + "\n")
