"""Prometheus series of hyperparameter searches, on the operator's registry (``llmop.metrics``)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Gauge

from llmop.metrics import REGISTRY

TRIAL_STATES = ("Pending", "Running", "Succeeded", "Failed", "StoppedEarly", "Cancelled")

SEARCH_TRIALS = Gauge(
    "llmop_search_trials",
    "Trials of a hyperparameter search, by state",
    ["namespace", "search", "state"],
    registry=REGISTRY,
)
SEARCH_BEST = Gauge(
    "llmop_search_best_objective",
    "Best objective value among the search's succeeded trials",
    ["namespace", "search"],
    registry=REGISTRY,
)


def update(namespace: str, search: str, status: dict[str, Any]) -> None:
    counts = dict.fromkeys(TRIAL_STATES, 0)
    for trial in status.get("trials") or []:
        counts[trial["state"]] = counts.get(trial["state"], 0) + 1
    for state, n in counts.items():
        SEARCH_TRIALS.labels(namespace, search, state).set(n)
    best = (status.get("bestTrial") or {}).get("value")
    if best is not None:
        SEARCH_BEST.labels(namespace, search).set(best)


def forget(namespace: str, search: str) -> None:
    """Drop the search's series: no stale series once it is deleted."""
    for state in TRIAL_STATES:
        try:
            SEARCH_TRIALS.remove(namespace, search, state)
        except KeyError:
            pass
    try:
        SEARCH_BEST.remove(namespace, search)
    except KeyError:
        pass
