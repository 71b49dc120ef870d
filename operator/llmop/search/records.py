"""Bookkeeping on the trial records in a search's status: creation, observations, counts, best."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from llmop.search.study import Record
from llmop_contract.api.v1alpha1.search import Direction
from llmop_contract.api.v1alpha1.search_status import MAX_INTERMEDIATE_VALUES, TrialState

ACTIVE = (TrialState.PENDING.value, TrialState.RUNNING.value)
FINISHED = (
    TrialState.SUCCEEDED.value,
    TrialState.FAILED.value,
    TrialState.STOPPED_EARLY.value,
    TrialState.CANCELLED.value,
)


def new(index: int, name: str, values: dict[str, Any], now: str) -> Record:
    return {"index": index, "name": name, "parameters": values, "state": "Pending", "startTime": now}


def finish(record: Record, state: TrialState, now: str, message: str | None = None) -> None:
    record["state"] = state.value
    record["completionTime"] = now
    if message:
        record["message"] = message[:4096]


def observe(record: Record, step: int, value: float, exact: bool = True) -> bool:
    """Record the objective at a step; True when it is news (a new step, or a new value at the
    latest step: a read between an evaluation's start and end shows the previous value, and the
    next read corrects it)."""
    if not math.isfinite(value):
        return False  # JSON (and so status) has no NaN; the job's own status never shows one either
    values: list[dict[str, Any]] = record.setdefault("intermediateValues", [])
    if values and values[-1]["step"] == step:
        if values[-1]["value"] == value:
            return False
        values[-1]["value"] = value
        return True
    if values and step < values[-1]["step"]:
        return False  # an older reading (a restarted gang resuming from a checkpoint)
    if values and not exact and value == values[-1]["value"]:
        # The same loss to the last digit at a later evaluation step: the step counter moved on
        # before that evaluation finished. Wait for a read that shows its own value.
        return False
    values.append({"step": step, "value": value})
    thin(values)
    return True


def thin(values: list[dict[str, Any]], limit: int = MAX_INTERMEDIATE_VALUES) -> None:
    """Keep at most ``limit`` values: drop every second one but the first and the latest.

    A status has to fit in etcd's object limit with hundreds of trials; early stopping judges the
    latest value, which is always kept.
    """
    while len(values) > limit:
        keep = values[::2]
        if keep[-1] is not values[-1]:
            keep.append(values[-1])
        values[:] = keep


def count(records: Sequence[Record]) -> dict[str, int]:
    keys = {
        "Pending": "pending",
        "Running": "running",
        "Succeeded": "succeeded",
        "Failed": "failed",
        "StoppedEarly": "stoppedEarly",
        "Cancelled": "cancelled",
    }
    counts = dict.fromkeys(keys.values(), 0)
    for r in records:
        counts[keys[r["state"]]] += 1
    counts["total"] = len(records)
    counts["finished"] = sum(1 for r in records if r["state"] in FINISHED)
    return counts


def best(records: Sequence[Record], direction: Direction) -> Record | None:
    done = [r for r in records if r["state"] == "Succeeded" and r.get("value") is not None]
    if not done:
        return None
    sign = -1.0 if direction == Direction.MAXIMIZE else 1.0
    # Ties go to the earlier trial, so the answer does not depend on the order results arrived in.
    return min(done, key=lambda r: (sign * r["value"], r["index"]))


def summary(record: Record) -> str:
    values = ", ".join(f"{k}={v}" for k, v in (record.get("parameters") or {}).items())
    return f"{record['name']} ({values})"
