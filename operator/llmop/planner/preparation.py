"""Data preparation before training, when spec.data.prepare asks for it: one batch Job, or with
data.distributed one Indexed Job per phase (scan, dedup, cluster, write, commit), each created once
the one before it succeeded.

A phase Job that exists is never recreated: a finished phase is not redone on a retry or after an
operator restart, and within a phase the Job controller retries a failed index alone.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmop import conditions as cond
from llmop.observe import BatchJobView, PodView
from llmop.planner.context import PREPARE, Pass
from llmop.termination import refusal
from llmop_contract.api.v1alpha1.data import Distribution, PreparePhase
from llmop_contract.api.v1alpha1.status import (
    JobReason,
    JobState,
    PreparationStatus,
    PreparePhaseStatus,
    StageState,
)
from llmop_contract.protocol import TerminationMessage


def prepared(p: Pass) -> bool:
    """The data is prepared; otherwise the preparation Job is created, waited for, or has failed."""
    if p.spec.data.distributed is not None:
        return phases_prepared(p, p.spec.data.distributed)
    job = p.seen.prepare
    if job is None:
        p.plan.create_prepare = True
        p.stage(PREPARE, StageState.RUNNING)
        p.status.state = JobState.PREPARING
        return False
    if job.failed:
        # A refusal (exit 2: a missing source, malformed records) says what to fix; a crash has
        # only the Job's own message.
        why = refusal(_prepare_pods(p.seen.compress_pods, ""), "") or job.message
        p.stage(PREPARE, StageState.FAILED, why)
        p.fail(JobReason.PREPARATION_FAILED, f"data preparation Job {job.name} failed: {why}")
        return False
    if not job.succeeded:
        blocked = p.config_blocked(cond.PREPARED, _prepare_pods(p.seen.compress_pods, ""))
        p.stage(PREPARE, StageState.RUNNING).message = blocked  # cleared once the pod can start
        p.status.state = JobState.PREPARING
        return False
    p.stage(PREPARE, StageState.SUCCEEDED)
    message = f"Job {job.name} prepared the data"
    p.condition(cond.PREPARED, True, JobReason.PREPARATION_SUCCEEDED, message)
    return True


def phases_prepared(p: Pass, distributed: Distribution) -> bool:
    jobs = {j.prepare_phase: j for j in p.seen.prepare_phases}
    status = p.status.preparation = p.status.preparation or PreparationStatus()
    for phase in PreparePhase:
        entry = _entry(status, phase, distributed.count(phase))
        job = jobs.get(phase.value)
        if job is None:
            p.plan.create_prepare_phase = phase
            status.phase = phase
            p.stage(PREPARE, StageState.RUNNING, f"phase {phase.value}: starting {entry.pods} pod(s)")
            p.status.state = JobState.PREPARING
            return False
        pods = _prepare_pods(p.seen.compress_pods, phase.value)
        _observe(entry, job, pods)
        if job.failed:
            why = refusal(pods, "") or job.message
            entry.state = StageState.FAILED
            status.phase = phase
            p.stage(PREPARE, StageState.FAILED, f"phase {phase.value}: {why}")
            p.fail(
                JobReason.PREPARATION_FAILED,
                f"data preparation phase {phase.value} (Job {job.name}) failed: {why}",
            )
            return False
        if not job.succeeded:
            entry.state = StageState.RUNNING
            status.phase = phase
            blocked = p.config_blocked(cond.PREPARED, pods)
            done = len(_finished(pods))
            message = blocked or f"phase {phase.value}: {done}/{entry.pods} pod(s) done"
            p.stage(PREPARE, StageState.RUNNING, message)
            p.status.state = JobState.PREPARING
            return False
        entry.state = StageState.SUCCEEDED
    status.phase = None
    kept = status.phases[-1].documents_kept if status.phases else None
    p.stage(PREPARE, StageState.SUCCEEDED, f"{len(status.phases)} phases on {distributed.pods} pod(s)")
    if kept is not None:
        p.stage(PREPARE, StageState.SUCCEEDED).results["documentsKept"] = float(kept)
    message = f"{len(status.phases)} phases on {distributed.pods} pod(s) prepared the data"
    p.condition(cond.PREPARED, True, JobReason.PREPARATION_SUCCEEDED, message)
    return True


def _entry(status: PreparationStatus, phase: PreparePhase, pods: int) -> PreparePhaseStatus:
    for entry in status.phases:
        if entry.name == phase:
            return entry
    entry = PreparePhaseStatus(name=phase, state=StageState.PENDING, pods=pods)
    status.phases.append(entry)
    return entry


def _observe(entry: PreparePhaseStatus, job: BatchJobView, pods: list[PodView]) -> None:
    """The Job's index bookkeeping, and the documents its finished pods report."""
    entry.completed_indexes = job.completed_indexes or None
    entry.failed_indexes = job.failed_indexes or None
    entry.retries = job.failures
    read = kept = 0
    reported = False
    for pod in _finished(pods):
        results = TerminationMessage.decode(pod.termination_message).results
        if "documentsRead" in results or "documentsKept" in results:
            reported = True
            read += int(results.get("documentsRead", 0))
            kept += int(results.get("documentsKept", 0))
    if reported:
        entry.documents_read, entry.documents_kept = read, kept


def _finished(pods: Iterable[PodView]) -> list[PodView]:
    """One succeeded pod per index (a retried index has one success at most, but be exact)."""
    by_index: dict[int, PodView] = {}
    for pod in pods:
        if pod.succeeded and pod.completion_index is not None:
            by_index.setdefault(pod.completion_index, pod)
    return list(by_index.values())


def _prepare_pods(pods: Iterable[PodView], phase: str) -> list[PodView]:
    """The preparation pods (stage "": not a compression stage's) of ``phase`` ("" = the single Job)."""
    return [x for x in pods if x.stage == "" and x.prepare_phase == phase]
