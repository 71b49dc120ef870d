"""An in-memory Optuna study rebuilt from the trials recorded in a search's status.

The operator keeps no Optuna storage: status is the only memory, so a restarted operator (or a
second pass) sees exactly the history the first one saw. Each recorded trial is replayed with its
parameters, final value and intermediate values through ``create_trial`` + ``add_trial``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.pruners import BasePruner, NopPruner
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState, create_trial

from llmop.search import space
from llmop_contract.api.v1alpha1 import search_status
from llmop_contract.api.v1alpha1.search import Direction, LLMHyperparameterSearchSpec
from llmop_contract.api.v1alpha1.search_status import TrialStatus

# Rebuilding a study many times a minute would log every replayed trial.
optuna.logging.set_verbosity(optuna.logging.ERROR)

# A trial's state in status -> in Optuna; a cancelled trial is not replayed.
_STATES = {
    search_status.TrialState.SUCCEEDED: TrialState.COMPLETE,
    search_status.TrialState.STOPPED_EARLY: TrialState.PRUNED,
    search_status.TrialState.FAILED: TrialState.FAIL,
    search_status.TrialState.PENDING: TrialState.RUNNING,
    search_status.TrialState.RUNNING: TrialState.RUNNING,
}


def intermediate(record: TrialStatus) -> dict[int, float]:
    return {iv.step: float(iv.value) for iv in record.intermediate_values}


def frozen(
    record: TrialStatus, dists: dict[str, BaseDistribution], system_attrs: dict[str, Any] | None = None
) -> FrozenTrial | None:
    """A recorded trial as Optuna sees it; None when it cannot be replayed (cancelled, or values the
    current space does not contain)."""
    state = _STATES.get(record.state)
    params = record.parameters
    if state is None or set(params) != set(dists):
        return None
    try:
        if not all(d._contains(d.to_internal_repr(params[n])) for n, d in dists.items()):
            return None
    except (ValueError, TypeError):
        return None
    value = record.value
    if state == TrialState.COMPLETE and value is None:
        return None
    return create_trial(
        state=state,
        params=params,
        distributions=dists,
        value=value if state == TrialState.COMPLETE else None,
        intermediate_values=intermediate(record),
        system_attrs=system_attrs,
    )


def build(
    spec: LLMHyperparameterSearchSpec,
    records: Iterable[TrialStatus],
    sampler: BaseSampler | None = None,
    pruner: BasePruner | None = None,
    system_attrs: Callable[[TrialStatus], dict[str, Any]] | None = None,
) -> optuna.Study:
    maximize = spec.objective.direction == Direction.MAXIMIZE
    direction = StudyDirection.MAXIMIZE if maximize else StudyDirection.MINIMIZE
    study = optuna.create_study(
        storage=optuna.storages.InMemoryStorage(),
        sampler=sampler or RandomSampler(seed=0),
        pruner=pruner or NopPruner(),
        direction=direction,
    )
    dists = space.distributions(spec.parameters)
    for record in records:
        attrs = system_attrs(record) if system_attrs else None
        if (trial := frozen(record, dists, attrs)) is not None:
            study.add_trial(trial)
    return study
