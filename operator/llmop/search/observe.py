"""Reads a search's child LLMTrainingJobs into small immutable views, and their objective figures."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmop.api.v1alpha1.search import ObjectiveMetric
from llmop.search.builders import PARAMETERS_ANNOTATION, SEARCH_ROLE_LABEL, TRIAL_INDEX_LABEL


@dataclass(frozen=True)
class JobView:
    """What the search needs of one child LLMTrainingJob."""

    name: str
    role: str
    index: int
    parameters: dict[str, Any] | None
    state: str | None
    succeeded: bool
    failed: bool
    failure: str
    step: int | None
    total_steps: int | None
    loss: float | None
    validation_loss: float | None
    eval_interval: int
    disruptions: int
    deleting: bool


def _true(conditions: list[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_ and c.get("status") == "True"), None)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _parameters(text: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def job_view(body: Mapping[str, Any]) -> JobView:
    meta = body.get("metadata", {})
    labels = meta.get("labels") or {}
    status = body.get("status") or {}
    progress = status.get("progress") or {}
    conditions = status.get("conditions") or []
    failed = _true(conditions, "Failed")
    evaluation = ((body.get("spec") or {}).get("training") or {}).get("evaluation") or {}
    try:
        index = int(labels.get(TRIAL_INDEX_LABEL, "-1"))
    except ValueError:
        index = -1
    step = _number(progress.get("step"))
    total = _number(progress.get("totalSteps"))
    return JobView(
        name=meta.get("name", ""),
        role=labels.get(SEARCH_ROLE_LABEL, ""),
        index=index,
        parameters=_parameters((meta.get("annotations") or {}).get(PARAMETERS_ANNOTATION)),
        state=status.get("state"),
        succeeded=_true(conditions, "Succeeded") is not None,
        failed=failed is not None,
        failure=f"{failed.get('reason', '')}: {failed.get('message', '')}" if failed else "",
        step=int(step) if step is not None else None,
        total_steps=int(total) if total is not None else None,
        loss=_number(progress.get("loss")),
        validation_loss=_number(progress.get("validationLoss")),
        eval_interval=int(evaluation.get("intervalSteps") or 1),
        disruptions=int(status.get("disruptionCount") or 0),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def observation(job: JobView, metric: ObjectiveMetric) -> tuple[int, float] | None:
    """(step, objective value) as the job's status shows them now, or None before any figure.

    The validation loss in progress is that of the latest evaluation, which ran at the last multiple
    of evaluation.intervalSteps at or below the current step (or at the final step once training
    succeeded); the training loss is that of the current step.
    """
    if job.step is None:
        return None
    if metric == ObjectiveMetric.TRAINING_LOSS:
        return None if job.loss is None else (job.step, job.loss)
    if job.validation_loss is None:
        return None
    final = job.succeeded or (job.total_steps is not None and job.step >= job.total_steps)
    step = job.step if final else job.step - job.step % job.eval_interval
    return step, job.validation_loss
