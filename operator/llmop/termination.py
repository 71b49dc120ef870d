"""Reading a stage's final figures from its pod's termination message (written by llmtrain).

The message is untrusted text of at most 4 KiB: ``TerminationMessage.decode`` drops anything that is
not the expected shape rather than failing the reconcile, so a crashing trainer cannot wedge the
operator. Status maps are bounded (StageStatus.results has maxProperties 64, ``MAX_RESULTS``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from llmop.observe import PodView
from llmop_contract.protocol import ExitCode, TerminationMessage

# Figures worth a word in the stage's message, in this order.
_SUMMARY = (
    ("sizeRatio", "size x{:.3f}"),
    ("perplexityIncreasePercent", "perplexity {:+.2f}%"),
    ("speedup", "speed x{:.2f}"),
    ("sparsity", "sparsity {:.2f}"),
    ("maxAbsDiff", "max |diff| {:.2e}"),
)


@dataclass(frozen=True)
class Figures:
    progress: dict[str, Any] = field(default_factory=dict)
    results: dict[str, float] = field(default_factory=dict)
    model_path: str | None = None
    model_uri: str | None = None  # where the stage uploaded it under storage.remote.uri
    summary: list[str] = field(default_factory=list)
    message: TerminationMessage = field(default_factory=TerminationMessage)
    """The whole decoded message (how training resumed, for planner.resume)."""


def final_figures(message: str) -> Figures:
    data = TerminationMessage.decode(message)
    progress: dict[str, Any] = {}
    step, total = data.step, data.total_steps
    if step is not None:
        progress["step"] = step
    if total:
        progress["totalSteps"] = total
        if step is not None:
            progress["percent"] = min(100, int(100 * step / total))
            progress["summary"] = f"{step}/{total} ({progress['percent']}%)"
            if step >= total:
                progress["etaSeconds"] = 0
    for key, value in (("loss", data.loss), ("validationLoss", data.validation_loss)):
        if value is not None:
            progress[key] = round(value, 6)  # as progress.to_status: six decimals for losses
    if data.validation_step is not None and "validationLoss" in progress:
        progress["validationStep"] = data.validation_step
    # The trainer's goodput and energy inputs at its last step (progress.goodput makes the shares).
    for key in ("productiveSeconds", "energyJoules", "joulesPerToken"):
        if key in data.results:
            progress[key] = data.results[key]
    results = {key: round(value, 6) for key, value in data.results.items()}  # at most MAX_RESULTS
    summary = [fmt.format(results[k]) for k, fmt in _SUMMARY if k in results]
    return Figures(progress, results, data.model_path, data.model_uri, summary, data)


def refusal(pods: Iterable[PodView], stage: str) -> str | None:
    """The one line a stage's pod refused its input with (exit 2, ``llmtrain.exits.refuse``), or None.

    The trainer writes it into the termination message, so the job's condition says what to fix
    ("spec.model.pretrained.uri: ... does not exist") instead of the Job's "reached the backoff limit".
    """
    for pod in pods:
        if pod.stage == stage and pod.exit_code == ExitCode.BAD_CONFIG and pod.termination_message:
            text = TerminationMessage.decode(pod.termination_message).extra.get("message")
            if text:
                return str(text)
    return None
