"""Observed state of an LLMHyperparameterSearch, written only by the operator (status subresource).

The trial list is also the search's memory: the sampler's history is rebuilt from it on every pass,
and a trial is recorded here before its LLMTrainingJob is created, so a restarted operator neither
loses a result nor starts a trial twice.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from llmop_contract.api.base import ApiModel
from llmop_contract.api.v1alpha1.search import Value
from llmop_contract.api.v1alpha1.status import Condition

# Per trial; a running trial reports one value per evaluation, so long runs are thinned (docs/search.md).
MAX_INTERMEDIATE_VALUES = 40


class SearchState(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class TrialState(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    STOPPED_EARLY = "StoppedEarly"
    CANCELLED = "Cancelled"


ACTIVE_TRIAL_STATES = frozenset({TrialState.PENDING, TrialState.RUNNING})
FINISHED_TRIAL_STATES = frozenset(set(TrialState) - ACTIVE_TRIAL_STATES)
# Finished trials whose job the search stopped; a stop that has not taken yet is repeated.
STOPPED_TRIAL_STATES = frozenset({TrialState.STOPPED_EARLY, TrialState.CANCELLED})


class SearchReason(StrEnum):
    """Reasons of the search's conditions."""

    SEARCH_CREATED = "SearchCreated"
    TRIALS_RUNNING = "TrialsRunning"
    TRAINING_BEST = "TrainingBest"
    SEARCH_SUCCEEDED = "SearchSucceeded"
    BEST_TRIAL_FOUND = "BestTrialFound"
    INVALID_SPEC = "InvalidSpec"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    MAX_FAILED_TRIALS_EXCEEDED = "MaxFailedTrialsExceeded"
    ALGORITHM_UNAVAILABLE = "AlgorithmUnavailable"
    NO_TRIAL_SUCCEEDED = "NoTrialSucceeded"
    BEST_JOB_DELETED = "BestJobDeleted"
    BEST_JOB_FAILED = "BestJobFailed"


class TrialEvent(StrEnum):
    """Reasons of the Events the search posts about its trials."""

    CREATED = "TrialCreated"
    SUCCEEDED = "TrialSucceeded"
    FAILED = "TrialFailed"
    STOPPED_EARLY = "TrialStoppedEarly"


class IntermediateValue(ApiModel):
    """The objective as the trial reported it at one step."""

    step: int = Field(ge=0)
    """Training step the value was computed at."""
    value: float
    """Objective value."""


class EarlyStop(ApiModel):
    """Why and when a trial was stopped early."""

    rule: str = Field(max_length=64)
    """The earlyStopping rule that stopped it (Median, SuccessiveHalving)."""
    step: int = Field(ge=0)
    """Step of the intermediate value that was judged."""
    message: str = Field("", max_length=1024)
    """Detail."""


class TrialStatus(ApiModel):
    """One trial and its LLMTrainingJob."""

    index: int = Field(ge=0)
    """Position in the search (0-based); the trial job is named <search>-NNN after it."""
    name: str = Field(max_length=63)
    """Name of the trial's LLMTrainingJob."""
    parameters: dict[str, Value] = Field(default_factory=dict)
    """Parameter values of this trial, by parameter name."""
    state: TrialState
    """Pending (recorded, job starting), Running, Succeeded, Failed, StoppedEarly or Cancelled (the search ended first)."""
    job_state: str | None = Field(None, max_length=64)
    """State of the trial's LLMTrainingJob."""
    value: float | None = None
    """Objective value of a succeeded trial."""
    step: int | None = Field(None, ge=0)
    """Latest training step seen."""
    intermediate_values: list[IntermediateValue] = Field(default_factory=list)
    """Objective values seen while training, the ones early stopping judges."""
    stopped_early: EarlyStop | None = None
    """Set when the trial was stopped early."""
    preemptions: int = Field(0, ge=0)
    """Gang restarts caused by evictions or preemptions; they restart the trial and do not fail it."""
    message: str | None = Field(None, max_length=4096)
    """Detail, e.g. why the trial failed."""
    start_time: str | None = None
    """When the trial was recorded."""
    completion_time: str | None = None
    """When the trial finished."""


class BestTrial(ApiModel):
    """The best succeeded trial so far."""

    name: str = Field(max_length=63)
    """Trial job name."""
    index: int = Field(ge=0)
    """Trial index."""
    parameters: dict[str, Value] = Field(default_factory=dict)
    """Its parameter values."""
    value: float
    """Its objective value."""


class TrialCounts(ApiModel):
    """Trials by state."""

    total: int = 0
    """Trials recorded."""
    pending: int = 0
    """Recorded, job not yet running."""
    running: int = 0
    """Training."""
    succeeded: int = 0
    """Finished with an objective value."""
    failed: int = 0
    """Failed; counted against maxFailedTrials."""
    stopped_early: int = 0
    """Stopped by earlyStopping."""
    cancelled: int = 0
    """Stopped because the search ended."""
    finished: int = 0
    """succeeded + failed + stoppedEarly + cancelled."""


class BestJob(ApiModel):
    """The compressBest job: the best parameters trained again with compression."""

    name: str = Field(max_length=63)
    """LLMTrainingJob name (<search>-best)."""
    state: str = Field(max_length=64)
    """Its state (Pending until it is seen)."""


class LLMHyperparameterSearchStatus(ApiModel):
    """Observed state of an LLMHyperparameterSearch."""

    state: SearchState | None = None
    """One-word summary for printer columns; conditions carry the detail."""
    conditions: list[Condition] = Field(default_factory=list)
    """Created, Running, Succeeded, Failed."""
    observed_generation: int | None = None
    """metadata.generation last reconciled."""
    start_time: str | None = None
    """When the operator accepted the search."""
    completion_time: str | None = None
    """When the search Succeeded or Failed."""
    counts: TrialCounts | None = None
    """Trials by state."""
    trials: list[TrialStatus] = Field(default_factory=list)
    """Every trial, by index."""
    best_trial: BestTrial | None = None
    """Best succeeded trial."""
    best_job: BestJob | None = None
    """The compressBest job."""
