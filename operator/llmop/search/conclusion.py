"""The concluding phases: the failure policy (deadline, maxFailedTrials), the search's outcome
(running, succeeded with its best trial, failed), the compressBest job, and the summary fields."""

from __future__ import annotations

from llmop import conditions as cond
from llmop import deadline
from llmop.search import builders, records
from llmop.search.context import Pass
from llmop.search.schedule import exhausted
from llmop_contract.api.v1alpha1.search_status import (
    BestJob,
    SearchReason,
    SearchState,
    TrialState,
    TrialStatus,
)
from llmop_contract.api.v1alpha1.status import JobState


def deadline_exceeded(p: Pass) -> bool:
    """deadlineSeconds, by the rule jobs follow too (``llmop.deadline``); True once it failed the search."""
    limit = p.spec.deadline_seconds
    left = deadline.remaining(p.status.start_time, limit, p.seen.now)
    if left is None:
        return False
    if left > 0:
        p.plan.requeue_after = left
        return False
    assert limit is not None
    p.fail(SearchReason.DEADLINE_EXCEEDED, deadline.message("the search", "deadlineSeconds", limit))
    return True


def too_many_failures(p: Pass) -> bool:
    failed = [r for r in p.records if r.state == TrialState.FAILED]
    limit = p.spec.max_failed_trials
    if len(failed) <= limit:
        return False
    last = failed[-1]
    p.fail(
        SearchReason.MAX_FAILED_TRIALS_EXCEEDED,
        f"{len(failed)} trials failed, more than maxFailedTrials={limit}; last: {last.name}:"
        f" {last.message or ''}",
    )
    return True


def conclude(p: Pass) -> None:
    best = records.best(p.records, p.spec.objective.direction)
    if p.active() or not exhausted(p):
        _running(p, best)
        return
    if best is None:
        p.fail(SearchReason.NO_TRIAL_SUCCEEDED, f"all {len(p.records)} trials finished and none succeeded")
        return
    if p.spec.compress_best and not best_job_done(p, best):
        return
    metric = p.spec.objective.metric.value
    message = f"best {records.summary(best)}: {metric} {best.value:.6g} after {len(p.records)} trials"
    p.condition(cond.RUNNING, False, SearchReason.SEARCH_SUCCEEDED, message)
    p.condition(cond.SUCCEEDED, True, SearchReason.BEST_TRIAL_FOUND, message)
    p.status.completion_time = p.now
    p.status.state = SearchState.SUCCEEDED


def _running(p: Pass, best: TrialStatus | None) -> None:
    counts = records.count(p.records)
    best_text = f"; best {records.summary(best)} = {best.value:.6g}" if best else ""
    p.status.state = SearchState.RUNNING
    message = (
        f"{counts.pending} pending, {counts.running} running,"
        f" {counts.finished} of {p.spec.max_trials} finished"
    )
    p.condition(cond.RUNNING, True, SearchReason.TRIALS_RUNNING, message + best_text)


def best_job_done(p: Pass, best: TrialStatus) -> bool:
    """compressBest: the best values trained again with compression; True once it succeeded."""
    name = builders.best_name(p.search.name)
    if p.status.best_job is None:
        p.status.best_job = BestJob(name=name, state=JobState.PENDING.value)
    entry = p.status.best_job
    job = p.best_job
    p.status.state = SearchState.RUNNING
    if job is None:
        if entry.state != JobState.PENDING:
            p.fail(SearchReason.BEST_JOB_DELETED, f"{name} was deleted before it finished")
        else:
            p.plan.create_best = True
            message = f"training {records.summary(best)} with compression"
            p.condition(cond.RUNNING, True, SearchReason.TRAINING_BEST, message)
        return False
    entry.state = job.state or JobState.PENDING.value
    if job.failed:
        p.fail(SearchReason.BEST_JOB_FAILED, f"{name}: {job.failure}")
        return False
    if not job.succeeded:
        p.condition(cond.RUNNING, True, SearchReason.TRAINING_BEST, f"{name} is {entry.state}")
    return job.succeeded


def summarise(p: Pass) -> None:
    """The fields a reader (printer columns, metrics) sees first: counts and the best trial."""
    p.status.counts = records.count(p.records)
    if best := records.best(p.records, p.spec.objective.direction):
        p.status.best_trial = records.best_trial(best)
