"""Prometheus metrics served by rank 0, and the throughput/MFU arithmetic behind them."""

from __future__ import annotations

import os
import resource
import sys

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from llmop_contract.protocol import Env, Metric
from llmtrain.model.args import LlamaArgs

# Dense BF16/FP16 tensor-core peak per device, FLOP/s (vendor datasheets, without sparsity).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "V100": 125e12,
}


def transformer_flops_per_token(
    parameters: int, layers: int, heads: int, head_dim: int, seq_len: int, trainable: int | None = None
) -> float:
    """Model FLOPs per trained token: 4N + 2N_t + 12*L*H*Q*T (N_t = N, every weight trains: PaLM's 6N).

    PaLM (Chowdhery et al. 2022, app. B) counts 2N for the forward and 4N for the backward of the
    weight matmuls, plus 12*L*H*Q*T for attention scores and values (forward and backward). The
    backward's 4N is 2N for the activation gradients, which every weight needs as long as anything
    before it trains, and 2N for the weight gradients, which frozen weights skip: with LoRA only the
    adapters' N_t get them, so 4N + 2N_t (N includes the adapters). Recomputation under activation
    checkpointing is not counted (MFU counts the model's FLOPs, not the hardware's).
    """
    n_t = parameters if trainable is None else trainable
    return 4 * parameters + 2 * n_t + 12 * layers * heads * head_dim * seq_len


def flops_per_token(args: LlamaArgs, seq_len: int) -> float:
    """The from-scratch model's FLOPs per token (every weight trains: 6N + 12*L*H*Q*T)."""
    return transformer_flops_per_token(
        args.num_parameters(), args.num_layers, args.num_heads, args.head_dim, seq_len
    )


def peak_flops_per_device() -> float | None:
    """LLMOP_PEAK_FLOPS if set, else the table entry for the CUDA device name; None on CPU."""
    env = os.environ.get(Env.PEAK_FLOPS)
    if env:
        return float(env)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    # Longest key first, so "H100 PCIe" wins over "H100".
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_FLOPS[key]
    return None


def memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def current_rss_bytes() -> int:
    """This process's resident memory now (memory_bytes is the peak since start)."""
    import psutil  # type: ignore[import-untyped]

    return int(psutil.Process().memory_info().rss)


class Metrics:
    """The llmtrain_* series. Every rank updates them; only rank 0 serves them."""

    def __init__(self, with_mfu: bool = False) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step = Gauge(Metric.STEP.value, "Optimiser steps completed", registry=r)
        self.total_steps = Gauge(Metric.TOTAL_STEPS.value, "Optimiser steps in the run", registry=r)
        self.tokens = Counter("llmtrain_tokens", "Training tokens consumed (all ranks)", registry=r)
        self.loss = Gauge(
            Metric.LOSS.value, "Training loss (mean over ranks, last log interval step)", registry=r
        )
        self.val_loss = Gauge(Metric.VALIDATION_LOSS.value, "Validation loss", registry=r)
        self.val_ppl = Gauge("llmtrain_validation_perplexity", "Validation perplexity", registry=r)
        # The step counter moves before an evaluation ends: this says which step the loss belongs to.
        self.val_step = Gauge(
            Metric.VALIDATION_STEP.value, "Step at which the latest validation loss was computed", registry=r
        )
        self.lr = Gauge("llmtrain_learning_rate", "Learning rate", registry=r)
        self.tokens_per_second = Gauge(
            Metric.TOKENS_PER_SECOND.value, "Training tokens/s (all ranks)", registry=r
        )
        self.samples_per_second = Gauge(
            "llmtrain_samples_per_second", "Training samples/s (all ranks)", registry=r
        )
        # Without a known device peak (CPU, unknown GPU) MFU is meaningless, so the series do not exist.
        self.flops_per_second: Gauge | None = None
        self.mfu: Gauge | None = None
        if with_mfu:
            self.flops_per_second = Gauge("llmtrain_flops_per_second", "Model FLOP/s, all ranks", registry=r)
            self.mfu = Gauge("llmtrain_mfu", "Model FLOPs utilisation (PaLM), 0-1", registry=r)
        self.checkpoint_seconds = Gauge(
            Metric.CHECKPOINT_SECONDS.value, "Duration of the last checkpoint", registry=r
        )
        self.checkpoint_fallbacks = Gauge(
            Metric.CHECKPOINT_FALLBACKS.value,
            "Checkpoints that failed verification at the last resume (set aside as rejected-<tag>)",
            registry=r,
        )
        self.resumed_from_step = Gauge(
            Metric.RESUMED_FROM_STEP.value,
            "Step of the checkpoint resumed from (0: from scratch)",
            registry=r,
        )
        self.memory = Gauge("llmtrain_memory_bytes", "Peak RSS (CPU) or CUDA max allocated bytes", registry=r)
        # What the parallel mesh shrinks per rank (train/memory.py), measured after the attempt's first step.
        self.parameter_bytes = Gauge(
            "llmtrain_parameter_bytes",
            "Parameter bytes rank 0 holds (its shard under ZeRO-3, tensor, pipeline)",
            registry=r,
        )
        self.optimizer_state_bytes = Gauge(
            "llmtrain_optimizer_state_bytes",
            "Optimizer state bytes rank 0 holds (moments, ZeRO's fp32 partitions, master weights)",
            registry=r,
        )
        self.pipeline_bubble = Gauge(
            "llmtrain_pipeline_bubble_fraction",
            "Idle share of each pipeline stage under 1F1B: (stages - 1) / (micro-batches + stages - 1); 0 without pipeline",
            registry=r,
        )
        self.eta = Gauge(Metric.ETA_SECONDS.value, "Estimated seconds to the last step", registry=r)
        self.sparsity = Gauge("llmtrain_sparsity", "Fraction of prunable weights masked", registry=r)
        # Measured energy only (NVML on GPUs, RAPL on CPUs; llmtrain.energy): while available is 0 the
        # two gauges below stay at 0 and mean nothing (the operator reports energyMeasured false).
        self.energy_available = Gauge(
            Metric.ENERGY_AVAILABLE.value, "1 when every rank's devices report energy, else 0", registry=r
        )
        self.energy_joules = Gauge(
            Metric.ENERGY_JOULES.value,
            "Energy of the job's devices so far (all ranks, all attempts)",
            registry=r,
        )
        self.joules_per_token = Gauge(
            Metric.JOULES_PER_TOKEN.value, "Energy so far per trained token", registry=r
        )
        self.productive_seconds = Gauge(
            Metric.PRODUCTIVE_SECONDS.value,
            "Seconds of the training steps kept (recomputed steps count once)",
            registry=r,
        )
        self.port: int | None = None

    def serve(self, port: int, addr: str | None = None) -> int:
        """Start the HTTP endpoint; port 0 picks a free one. Returns the bound port."""
        host = addr or os.environ.get(Env.METRICS_ADDR, "127.0.0.1")
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(server.server_port)
        return self.port


class Throughput:
    """Rates over the last log interval, and an ETA from them."""

    def __init__(
        self, tokens_per_step: int, samples_per_step: int, flops_per_token: float, world: int
    ) -> None:
        self.tokens_per_step = tokens_per_step
        self.samples_per_step = samples_per_step
        self.flops_per_token = flops_per_token
        peak = peak_flops_per_device()
        self.peak_total = peak * world if peak else None
        self._last: tuple[int, float] | None = None

    def mark(self, step: int, now: float) -> None:
        self._last = (step, now)

    def rates(self, step: int, now: float, total_steps: int) -> dict[str, float]:
        assert self._last is not None, "mark() the starting step first"
        steps, seconds = step - self._last[0], max(now - self._last[1], 1e-9)
        self._last = (step, now)
        tokens_per_second = steps * self.tokens_per_step / seconds
        out = {
            "tokens_per_second": tokens_per_second,
            "samples_per_second": steps * self.samples_per_step / seconds,
            "eta_seconds": (total_steps - step) * seconds / max(steps, 1),
        }
        if self.peak_total:
            out["flops_per_second"] = tokens_per_second * self.flops_per_token
            out["mfu"] = out["flops_per_second"] / self.peak_total
        return out
