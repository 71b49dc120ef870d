"""Prometheus series of hyperparameter searches, on the operator's registry (``llmop.metrics``)."""

from __future__ import annotations

from prometheus_client import Gauge

from llmop.metrics import REGISTRY
from llmop_contract.api.v1alpha1.search_status import LLMHyperparameterSearchStatus, TrialState

TRIAL_STATES = tuple(TrialState)

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


def update(namespace: str, search: str, status: LLMHyperparameterSearchStatus) -> None:
    counts = dict.fromkeys(TRIAL_STATES, 0)
    for trial in status.trials:
        counts[trial.state] += 1
    for state, n in counts.items():
        SEARCH_TRIALS.labels(namespace, search, state.value).set(n)
    if status.best_trial is not None:
        SEARCH_BEST.labels(namespace, search).set(status.best_trial.value)


def forget(namespace: str, search: str) -> None:
    """Drop the search's series: no stale series once it is deleted."""
    for state in TRIAL_STATES:
        try:
            SEARCH_TRIALS.remove(namespace, search, state.value)
        except KeyError:
            pass
    try:
        SEARCH_BEST.remove(namespace, search)
    except KeyError:
        pass
