"""Training progress, read from the rank-0 trainer's Prometheus endpoint at a bounded rate."""

from __future__ import annotations

import asyncio
import urllib.request
from datetime import datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from llmop.conditions import now_iso, parse_time
from llmop_contract import interval
from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.status import LLMTrainingJobStatus, Progress
from llmop_contract.protocol import Metric

# The trainer's metric -> the status.progress field it feeds.
_FIELDS: dict[str, str] = {
    Metric.STEP: "step",
    Metric.TOTAL_STEPS: "totalSteps",
    Metric.LOSS: "loss",
    Metric.VALIDATION_LOSS: "validationLoss",
    Metric.VALIDATION_STEP: "validationStep",
    Metric.TOKENS_PER_SECOND: "tokensPerSecond",
    Metric.ETA_SECONDS: "etaSeconds",
    # Not progress: how the attempt resumed (planner.resume: status.resume and its Events).
    Metric.CHECKPOINT_FALLBACKS: "checkpointFallbacks",
    Metric.RESUMED_FROM_STEP: "resumedFromStep",
    Metric.RESUMED_FROM_REMOTE: "resumedFromRemote",
    # storage.remote (planner.remote): status.remote, the RemoteSynced condition and its Events.
    Metric.REMOTE_CHECKPOINT_STEP: "remoteCheckpointStep",
    Metric.REMOTE_UPLOADS_PENDING: "remoteUploadsPending",
    Metric.REMOTE_UPLOAD_FAILURES: "remoteUploadFailures",
    Metric.REMOTE_UPLOAD_FAILING: "remoteUploadFailing",
    # Goodput, energy and the recommended checkpoint interval (issue 19): status.progress.
    Metric.CHECKPOINT_SECONDS: "checkpointSeconds",
    Metric.PRODUCTIVE_SECONDS: "productiveSeconds",
    Metric.ENERGY_AVAILABLE: "energyAvailable",
    Metric.ENERGY_JOULES: "energyJoules",
    Metric.JOULES_PER_TOKEN: "joulesPerToken",
}


def settle_interruption(
    status: LLMTrainingJobStatus, values: dict[str, float], now: datetime
) -> float | None:
    """Fill in what the last restart cost once the attempt that resumed is back where the interrupted
    one was; returns the seconds lost then (once), else None. Precise to the scrape interval."""
    last = status.interruptions[-1] if status.interruptions else None
    if last is None or last.attempt != status.attempt or last.lost_seconds is not None:
        return None
    if "resumedFromStep" in values and last.resumed_from_step is None:
        last.resumed_from_step = int(values["resumedFromStep"])
        last.recomputed_steps = max(0, last.step_before - last.resumed_from_step)
    step = int(values.get("step", 0))
    if step <= (last.resumed_from_step or 0) or step < last.step_before:
        return None
    last.lost_seconds = round(max(0.0, (now - parse_time(last.time)).total_seconds()), 1)
    return last.lost_seconds


def parse(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _FIELDS and not sample.labels:
                values[_FIELDS[sample.name]] = float(sample.value)
    return values


def to_status(
    values: dict[str, float],
    now: datetime,
    started: str | None = None,
    spec: LLMTrainingJobSpec | None = None,
) -> Progress:
    wire = to_wire(values, now, started)
    if spec is not None:
        wire.update(checkpoint_advice(values, spec))
    return Progress.model_validate(wire)


def checkpoint_advice(values: dict[str, float], spec: LLMTrainingJobSpec) -> dict[str, Any]:
    """The last checkpoint's duration and Daly's interval in steps for this job (needs both a saved
    checkpoint and a throughput figure)."""
    seconds, tokens_per_second = values.get("checkpointSeconds", 0.0), values.get("tokensPerSecond", 0.0)
    if seconds <= 0 or tokens_per_second <= 0:
        return {}
    workers, training = spec.workers, spec.training
    # Llama 3's rate is per GPU; a CPU job counts its processes, the nearest equivalent.
    devices = workers.num_nodes * (workers.gpus_per_node or workers.procs_per_node)
    step_seconds = training.global_batch_size * training.sequence_length / tokens_per_second
    mtbf = interval.mean_time_between_interruptions(devices)
    return {
        "checkpointSeconds": round(seconds, 3),
        "recommendedCheckpointIntervalSteps": interval.interval_steps(seconds, step_seconds, mtbf),
    }


def goodput(productive_seconds: float, started: str | None, now: datetime) -> float | None:
    """Productive seconds over the wall time since the job started (None before a second has passed)."""
    if started is None:
        return None
    wall = (now - parse_time(started)).total_seconds()
    return round(min(1.0, productive_seconds / wall), 4) if wall >= 1 else None


def energy_wire(values: dict[str, float]) -> dict[str, Any]:
    """The energy fields of status.progress: measured figures, or energyMeasured false alone."""
    if "energyAvailable" not in values:
        return {}
    if not values["energyAvailable"] or "energyJoules" not in values:
        return {"energyMeasured": False}
    joules = values["energyJoules"]
    out: dict[str, Any] = {"energyMeasured": True, "energyJoules": round(joules, 1)}
    out["energyKwh"] = round(joules / 3.6e6, 6)
    if "joulesPerToken" in values:
        out["joulesPerToken"] = float(f"{values['joulesPerToken']:.4g}")
    return out


def to_wire(values: dict[str, float], now: datetime, started: str | None = None) -> dict[str, Any]:
    """status.progress as a manifest shows it, from the scraped figures (``started``: status.startTime)."""
    step = int(values.get("step", 0))
    total = int(values["totalSteps"]) if values.get("totalSteps") else None
    out: dict[str, Any] = {"step": step, "updateTime": now_iso(now)}
    if total:
        out["totalSteps"] = total
        out["percent"] = min(100, int(100 * step / total))
        out["summary"] = f"{step}/{total} ({out['percent']}%)"
    # Losses keep six decimals (the trainer's own log precision): a search ranks trials by them, and
    # four decimals made trials tie and hid the last digits a reference run is compared on.
    for key, digits in (("loss", 6), ("validationLoss", 6), ("tokensPerSecond", 4)):
        if key in values and values[key] == values[key]:  # skip NaN
            out[key] = round(values[key], digits)
    if "validationStep" in values and "validationLoss" in out:
        out["validationStep"] = int(values["validationStep"])
    if "etaSeconds" in values:
        out["etaSeconds"] = max(0, int(values["etaSeconds"]))
    if "productiveSeconds" in values:
        out["productiveSeconds"] = round(values["productiveSeconds"], 1)
        if (share := goodput(values["productiveSeconds"], started, now)) is not None:
            out["goodput"] = share
    out.update(energy_wire(values))
    return out


def _fetch(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body: bytes = resp.read()
        return body.decode()


async def scrape(ip: str, port: int, timeout: float = 2.0) -> dict[str, float] | None:
    """Figures from http://IP:PORT/metrics, or None when the trainer is not serving yet."""
    host = f"[{ip}]" if ":" in ip else ip
    try:
        text = await asyncio.to_thread(_fetch, f"http://{host}:{port}/metrics", timeout)
    except OSError:
        return None
    return parse(text)
