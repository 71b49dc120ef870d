"""The next trial's parameter values: Grid by position, Random/TPE/GaussianProcess through Optuna.

Each trial's sampler is seeded from the search's seed and the trial's index, so a trial's values are
a function of (seed, index, history): asking twice for the same index with the same history (e.g.
after an operator restart lost an unrecorded decision) gives the same values, and two trials never
share a random stream.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence

from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler, GPSampler, RandomSampler, TPESampler

from llmop.search import space, study
from llmop.search.space import Values
from llmop_contract.api.v1alpha1.search import Algorithm, LLMHyperparameterSearchSpec
from llmop_contract.api.v1alpha1.search_status import TrialStatus


def trial_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"llmop-search/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def make_sampler(spec: LLMHyperparameterSearchSpec, index: int) -> BaseSampler:
    # GPSampler's deterministic_objective and TPE's constant_liar warn "experimental" on every
    # construction, i.e. on every trial.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return _make_sampler(spec, index)


def _make_sampler(spec: LLMHyperparameterSearchSpec, index: int) -> BaseSampler:
    seed = trial_seed(spec.seed, index)
    if spec.algorithm == Algorithm.RANDOM:
        return RandomSampler(seed=seed)
    if spec.algorithm == Algorithm.GAUSSIAN_PROCESS:
        # Training is deterministic given its parameters and seed: no observation noise to model.
        return GPSampler(seed=seed, n_startup_trials=spec.random_startup_trials, deterministic_objective=True)
    # With trials in parallel the running ones count as "lies" at the worst value seen, so TPE does
    # not send the next trial into the region a running one is already exploring.
    return TPESampler(
        seed=seed, n_startup_trials=spec.random_startup_trials, constant_liar=spec.parallel_trials > 1
    )


def suggest(spec: LLMHyperparameterSearchSpec, records: Sequence[TrialStatus], index: int) -> Values | None:
    """Values for trial ``index`` given the recorded trials; None when Grid has no point left."""
    if spec.algorithm == Algorithm.GRID:
        return space.grid_point(spec.parameters, index)
    replayed = study.build(spec, records, sampler=make_sampler(spec, index))
    trial = replayed.ask(space.distributions(spec.parameters))
    return space.normalize(spec.parameters, trial.params)
