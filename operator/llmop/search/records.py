"""Bookkeeping on the trial records in a search's status: creation, observations, counts, best."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

from llmop.search.space import Values
from llmop_contract.api.v1alpha1.search import Direction
from llmop_contract.api.v1alpha1.search_status import (
    ACTIVE_TRIAL_STATES,
    FINISHED_TRIAL_STATES,
    MAX_INTERMEDIATE_VALUES,
    BestTrial,
    IntermediateValue,
    TrialCounts,
    TrialState,
    TrialStatus,
)

T = TypeVar("T")


def new(index: int, name: str, values: Values, now: str) -> TrialStatus:
    return TrialStatus(index=index, name=name, parameters=values, state=TrialState.PENDING, start_time=now)


def is_active(record: TrialStatus) -> bool:
    return record.state in ACTIVE_TRIAL_STATES


def is_finished(record: TrialStatus) -> bool:
    return record.state in FINISHED_TRIAL_STATES


def finish(record: TrialStatus, state: TrialState, now: str, message: str | None = None) -> None:
    record.state = state
    record.completion_time = now
    if message:
        record.message = message[:4096]


def observe(record: TrialStatus, step: int, value: float, exact: bool = True) -> bool:
    """Record the objective at a step; True when it is news (a new step, or a new value at the
    latest step: a read between an evaluation's start and end shows the previous value, and the
    next read corrects it)."""
    if not math.isfinite(value):
        return False  # JSON (and so status) has no NaN; the job's own status never shows one either
    values = record.intermediate_values
    if values and values[-1].step == step:
        if values[-1].value == value:
            return False
        values[-1].value = value
        return True
    if values and step < values[-1].step:
        return False  # an older reading (a restarted gang resuming from a checkpoint)
    if values and not exact and value == values[-1].value:
        # The same loss to the last digit at a later evaluation step: the step counter moved on
        # before that evaluation finished. Wait for a read that shows its own value.
        return False
    values.append(IntermediateValue(step=step, value=value))
    thin(values)
    return True


def thin(values: list[T], limit: int = MAX_INTERMEDIATE_VALUES) -> None:
    """Keep at most ``limit`` values: drop every second one but the first and the latest.

    A status has to fit in etcd's object limit with hundreds of trials; early stopping judges the
    latest value, which is always kept.
    """
    while len(values) > limit:
        keep = values[::2]
        if keep[-1] is not values[-1]:
            keep.append(values[-1])
        values[:] = keep


def count(records: Sequence[TrialStatus]) -> TrialCounts:
    n = dict.fromkeys(TrialState, 0)
    for r in records:
        n[r.state] += 1
    return TrialCounts(
        total=len(records),
        pending=n[TrialState.PENDING],
        running=n[TrialState.RUNNING],
        succeeded=n[TrialState.SUCCEEDED],
        failed=n[TrialState.FAILED],
        stopped_early=n[TrialState.STOPPED_EARLY],
        cancelled=n[TrialState.CANCELLED],
        finished=sum(n[s] for s in FINISHED_TRIAL_STATES),
    )


def best(records: Sequence[TrialStatus], direction: Direction) -> TrialStatus | None:
    done = [(r.value, r) for r in records if r.state == TrialState.SUCCEEDED and r.value is not None]
    if not done:
        return None
    sign = -1.0 if direction == Direction.MAXIMIZE else 1.0
    # Ties go to the earlier trial, so the answer does not depend on the order results arrived in.
    return min(done, key=lambda vr: (sign * vr[0], vr[1].index))[1]


def best_trial(record: TrialStatus) -> BestTrial:
    assert record.value is not None
    return BestTrial(
        name=record.name, index=record.index, parameters=dict(record.parameters), value=record.value
    )


def summary(record: TrialStatus) -> str:
    values = ", ".join(f"{k}={v}" for k, v in record.parameters.items())
    return f"{record.name} ({values})"
