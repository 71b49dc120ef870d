"""The scheduling phase: record and plan new trials while slots are free and the budget lasts."""

from __future__ import annotations

from pydantic import ValidationError

from llmop.search import builders, records, sampler, space
from llmop.search.context import Pass
from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.search import Algorithm
from llmop_contract.api.v1alpha1.search_status import SearchReason, TrialEvent


def exhausted(p: Pass) -> bool:
    """Every trial the search will run is recorded (maxTrials, or the grid's size)."""
    planned = p.spec.max_trials
    if p.spec.algorithm == Algorithm.GRID:
        planned = min(planned, space.grid_size(p.spec.parameters))
    return len(p.records) >= planned


def schedule(p: Pass) -> None:
    running = len(p.active())
    while running < p.spec.parallel_trials and not exhausted(p):
        index = max((r.index for r in p.records), default=-1) + 1
        try:
            values = sampler.suggest(p.spec, p.records, index)
        except ImportError as exc:
            # GPSampler needs torch and scipy, which a slim operator image may not have.
            algorithm = p.spec.algorithm.value
            p.fail(
                SearchReason.ALGORITHM_UNAVAILABLE,
                f"{algorithm} needs {exc.name} in the operator's environment",
            )
            return
        if values is None:
            return
        record = records.new(index, builders.trial_name(p.search.name, index), values, p.now)
        p.records.append(record)
        if clash := _clash(p, values):
            # Values valid one by one can still clash (e.g. two sizes that must divide).
            p.trial_failed(record, clash)
            continue
        p.plan.create.append(index)
        p.event(False, TrialEvent.CREATED, records.summary(record))
        running += 1


def _clash(p: Pass, values: space.Values) -> str | None:
    """Why the trial's values do not make a valid LLMTrainingJob, or None when they do."""
    try:
        LLMTrainingJobSpec.model_validate(space.trial_spec(p.spec, values))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "spec"
        return f"InvalidParameters: {where}: {error['msg'].removeprefix('Value error, ')}"
    return None
