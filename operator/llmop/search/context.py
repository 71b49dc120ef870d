"""What one planning pass of a search shares between its phases: the search as read, what was seen
of its jobs, and the plan (typed status included) being built.

Each phase (``trials``, ``stopping``, ``schedule``, ``conclusion``) is a function of a ``Pass``;
``planner`` runs them in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from llmop import conditions as cond
from llmop.search import builders, records
from llmop.search.observe import JobView
from llmop_contract.api.v1alpha1.search import LLMHyperparameterSearchSpec
from llmop_contract.api.v1alpha1.search_status import (
    STOPPED_TRIAL_STATES,
    LLMHyperparameterSearchStatus,
    SearchReason,
    SearchState,
    TrialEvent,
    TrialState,
    TrialStatus,
)


@dataclass(frozen=True)
class SearchSnapshot:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: LLMHyperparameterSearchSpec
    status: LLMHyperparameterSearchStatus


@dataclass(frozen=True)
class Observed:
    jobs: list[JobView]  # every child LLMTrainingJob of the search
    now: datetime
    rejected: dict[int, str] = field(default_factory=dict)  # trial index -> why the apiserver refused its job


@dataclass
class Plan:
    status: LLMHyperparameterSearchStatus
    create: list[int] = field(default_factory=list)  # trial indices, each recorded in status
    create_best: bool = False
    delete: list[str] = field(default_factory=list)  # child job names
    transitions: list[cond.Transition] = field(default_factory=list)
    events: list[tuple[bool, str, str]] = field(default_factory=list)  # (warning, reason, message)
    requeue_after: float | None = None


class Pass:
    """One planning pass: the search, what was seen, and the plan the phases fill in."""

    def __init__(self, search: SearchSnapshot, seen: Observed) -> None:
        self.search, self.spec, self.seen = search, search.spec, seen
        self.plan = Plan(status=search.status.model_copy(deep=True))
        self.status = self.plan.status
        self.records: list[TrialStatus] = self.status.trials
        self.now = cond.now_iso(seen.now)
        self.jobs = {j.index: j for j in seen.jobs if j.role == builders.ROLE_TRIAL and j.index >= 0}
        self.best_job = next((j for j in seen.jobs if j.role == builders.ROLE_BEST), None)
        self.news: set[int] = set()  # trials with a new intermediate value this pass

    def condition(self, type_: str, status: bool, reason: SearchReason, message: str) -> None:
        t = cond.set_condition(
            self.status.conditions, type_, status, reason, message, self.search.generation, self.seen.now
        )
        if t:
            self.plan.transitions.append(t)

    def event(self, warning: bool, reason: TrialEvent, message: str) -> None:
        self.plan.events.append((warning, reason, message))

    def trial_failed(self, record: TrialStatus, message: str) -> None:
        records.finish(record, TrialState.FAILED, self.now, message)
        self.event(True, TrialEvent.FAILED, f"{record.name}: {message}")

    def finished(self) -> bool:
        c = self.status.conditions
        return cond.holds(c, cond.SUCCEEDED) or cond.holds(c, cond.FAILED)

    def active(self) -> list[TrialStatus]:
        return [r for r in self.records if records.is_active(r)]

    def stop_job(self, record: TrialStatus) -> None:
        job = self.jobs.get(record.index)
        if job is not None and not job.deleting:
            self.plan.delete.append(job.name)

    def restop(self, record: TrialStatus) -> None:
        """A stop that did not take yet (the deleted child is still there) is repeated."""
        if record.state in STOPPED_TRIAL_STATES:
            self.stop_job(record)

    def fail(self, reason: SearchReason, message: str) -> None:
        for r in self.active():
            records.finish(r, TrialState.CANCELLED, self.now, f"the search failed: {reason.value}")
            self.stop_job(r)
        self.condition(cond.RUNNING, False, reason, message)
        self.condition(cond.FAILED, True, reason, message)
        self.status.completion_time = self.now
        self.status.state = SearchState.FAILED
