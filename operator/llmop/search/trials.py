"""The bookkeeping phase: carry what each trial's job shows into its record in status."""

from __future__ import annotations

from llmop.search import records
from llmop.search.context import Pass
from llmop.search.observe import Observation, observation
from llmop_contract.api.v1alpha1.search_status import TrialEvent, TrialState, TrialStatus
from llmop_contract.api.v1alpha1.status import JobState


def adopt(p: Pass) -> None:
    """Children the status does not list (status written by an older operator, or restored from
    a backup without status) join it with the values their annotation recorded."""
    known = {r.index for r in p.records}
    for index, job in sorted(p.jobs.items()):
        if index not in known and job.parameters is not None:
            p.records.append(records.new(index, job.name, job.parameters, p.now))
    p.records.sort(key=lambda r: r.index)


def sync_all(p: Pass) -> None:
    for record in p.records:
        sync(p, record)


def sync(p: Pass, record: TrialStatus) -> None:
    """Carry what the trial's job shows into its record."""
    if records.is_finished(record):
        p.restop(record)
        return
    job = p.jobs.get(record.index)
    if job is None:
        if record.job_state is not None or record.index in p.seen.rejected:
            p.trial_failed(
                record, p.seen.rejected.get(record.index, "its job was deleted while the trial ran")
            )
        else:
            p.plan.create.append(record.index)
        return
    record.job_state = job.state or JobState.PENDING.value
    record.preemptions = job.disruptions
    if job.step is not None:
        record.step = job.step
    seen = observation(job, p.spec.objective.metric)
    if seen is not None and records.observe(record, seen.step, seen.value, seen.exact):
        p.news.add(record.index)
    if job.succeeded:
        _succeeded(p, record, seen)
    elif job.failed:
        p.trial_failed(record, job.failure)
    elif job.state is not None and job.state != JobState.PENDING:
        record.state = TrialState.RUNNING


def _succeeded(p: Pass, record: TrialStatus, seen: Observation | None) -> None:
    if seen is None:
        p.trial_failed(record, f"training succeeded but reported no {p.spec.objective.metric.value}")
        return
    record.value = seen.value
    records.finish(record, TrialState.SUCCEEDED, p.now)
    p.event(False, TrialEvent.SUCCEEDED, f"{records.summary(record)}: {seen.value:.6g}")
