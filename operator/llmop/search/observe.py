"""Reads a search's child LLMTrainingJobs into small immutable views, and their objective figures."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmop import conditions as cond
from llmop.observe import controller_uid
from llmop.search.builders import PARAMETERS_ANNOTATION, SEARCH_ROLE_LABEL, TRIAL_INDEX_LABEL
from llmop_contract.api.v1alpha1.search import ObjectiveMetric
from llmop_contract.api.v1alpha1.status import ConditionStatus


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
    validation_step: int | None  # progress.validationStep, where the operator reports it
    eval_interval: int
    disruptions: int
    deleting: bool
    owner_uid: str = ""  # the controller owner's UID: a trial is this search's only when it matches


def _true(conditions: list[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next(
        (c for c in conditions if c.get("type") == type_ and c.get("status") == ConditionStatus.TRUE), None
    )


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
    failed = _true(conditions, cond.FAILED)
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
        succeeded=_true(conditions, cond.SUCCEEDED) is not None,
        failed=failed is not None,
        failure=f"{failed.get('reason', '')}: {failed.get('message', '')}" if failed else "",
        step=int(step) if step is not None else None,
        total_steps=int(total) if total is not None else None,
        loss=_number(progress.get("loss")),
        validation_loss=_number(progress.get("validationLoss")),
        validation_step=int(v) if (v := _number(progress.get("validationStep"))) is not None else None,
        eval_interval=int(evaluation.get("intervalSteps") or 1),
        disruptions=int(status.get("disruptionCount") or 0),
        deleting=bool(meta.get("deletionTimestamp")),
        owner_uid=controller_uid(body),
    )


@dataclass(frozen=True)
class Observation:
    step: int
    value: float
    exact: bool  # False: the step is inferred and the value may still be the previous evaluation's


def observation(job: JobView, metric: ObjectiveMetric) -> Observation | None:
    """The objective as the job's status shows it now, or None before any figure.

    The training loss is that of the current step. The validation loss is that of the latest
    evaluation: at the final step once training succeeded (the trainer's own final figures), at
    progress.validationStep when the operator reports it, else at the last multiple of
    evaluation.intervalSteps at or below the current step. That last inference is not exact: the
    trainer advances its step counter before the evaluation at that step has finished.
    """
    if job.step is None:
        return None
    if metric == ObjectiveMetric.TRAINING_LOSS:
        return None if job.loss is None else Observation(job.step, job.loss, True)
    if job.validation_loss is None:
        return None
    if job.succeeded or (job.total_steps is not None and job.step >= job.total_steps):
        return Observation(job.step, job.validation_loss, True)
    if job.validation_step is not None:
        return Observation(job.validation_step, job.validation_loss, True)
    return Observation(job.step - job.step % job.eval_interval, job.validation_loss, False)
