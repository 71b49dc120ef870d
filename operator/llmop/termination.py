"""Reading a stage's final figures from its pod's termination message (written by llmtrain).

The message is untrusted text of at most 4 KiB: anything that is not the expected JSON shape is
ignored rather than failing the reconcile, so a crashing trainer cannot wedge the operator.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

# Status maps are bounded (StageStatus.results has maxProperties 64).
MAX_RESULTS = 64
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
    summary: list[str] = field(default_factory=list)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def final_figures(message: str) -> Figures:
    try:
        data = json.loads(message) if message else {}
    except ValueError:
        return Figures()
    if not isinstance(data, dict):
        return Figures()
    progress: dict[str, Any] = {}
    step, total = _number(data.get("step")), _number(data.get("totalSteps"))
    if step is not None:
        progress["step"] = int(step)
    if total:
        progress["totalSteps"] = int(total)
        if step is not None:
            progress["percent"] = min(100, int(100 * step / total))
            progress["summary"] = f"{int(step)}/{int(total)} ({progress['percent']}%)"
            if step >= total:
                progress["etaSeconds"] = 0
    for key in ("loss", "validationLoss"):
        if (value := _number(data.get(key))) is not None:
            progress[key] = round(value, 6)  # as progress.to_status: six decimals for losses
    if (value := _number(data.get("validationStep"))) is not None and "validationLoss" in progress:
        progress["validationStep"] = int(value)
    raw = data.get("results")
    raw = raw if isinstance(raw, dict) else {}
    results: dict[str, float] = {}
    for key, value in list(raw.items())[:MAX_RESULTS]:
        if (number := _number(value)) is not None:
            results[str(key)] = round(number, 6)
    summary = [fmt.format(results[k]) for k, fmt in _SUMMARY if k in results]
    path = data.get("modelPath")
    return Figures(progress, results, path if isinstance(path, str) and path else None, summary)
