"""The job's lifecycle around its stages: acknowledging it, its deadline, suspend and resume,
success, and what a finished job still needs (no running pods, serving, TTL clean-up)."""

from __future__ import annotations

from llmop import conditions as cond
from llmop import deadline
from llmop.planner import serving
from llmop.planner.context import Pass
from llmop_contract.api.v1alpha1.status import JobReason, JobState


def acknowledge(p: Pass) -> None:
    """Start time, the Created condition (and the job's base objects) once; the generation seen."""
    if not p.status.start_time:
        p.status.start_time = p.now
    if not p.holds(cond.CREATED):
        p.plan.ensure_base = True
        p.condition(cond.CREATED, True, JobReason.JOB_CREATED, f"LLMTrainingJob {p.job.name} accepted")
        p.status.state = JobState.PENDING
    p.observe_generation()


def deadline_exceeded(p: Pass) -> bool:
    limit = p.spec.run_policy.active_deadline_seconds
    if limit is None:
        return False
    left = deadline.remaining(p.status.start_time, limit, p.seen.now)
    if left is not None and left > 0:
        p.plan.requeue_after = left
        return False
    p.fail(JobReason.DEADLINE_EXCEEDED, deadline.message("job", "activeDeadlineSeconds", limit))
    return True


def suspended(p: Pass) -> bool:
    if p.spec.run_policy.suspend:
        p.delete_all_pods()
        message = "runPolicy.suspend is true: pods deleted, state kept"
        p.condition(cond.SUSPENDED, True, JobReason.SUSPENDED, message)
        p.condition(cond.RUNNING, False, JobReason.SUSPENDED, "the job is suspended")
        p.status.state = JobState.SUSPENDED
        return True
    if p.holds(cond.SUSPENDED):
        message = "the gang is recreated and resumes from its checkpoint"
        p.condition(cond.SUSPENDED, False, JobReason.RESUMED, message)
        # A new attempt (not counted against backoffLimit): the old gang's pods are gone.
        p.status.attempt += 1
    return False


def succeed(p: Pass, reason: JobReason, message: str) -> None:
    p.condition(cond.RUNNING, False, reason, message)
    p.condition(cond.SUCCEEDED, True, reason, message)
    p.status.completion_time = p.now
    p.status.state = JobState.SUCCEEDED
    after_finish(p)


def after_finish(p: Pass) -> None:
    # What a finished job still acts on (serving, the TTL) is read from the spec as it is now.
    p.observe_generation()
    # A failed job keeps no running pods (a Succeeded one has none); then TTL clean-up.
    p.plan.delete_pods = [x.name for x in p.seen.pods if not x.deleting and x.live]
    if p.holds(cond.SUCCEEDED):
        serving.serve(p)
    ttl = p.spec.run_policy.ttl_seconds_after_finished
    done = p.status.completion_time
    if ttl is not None and done:
        left = (cond.parse_time(done) - p.seen.now).total_seconds() + ttl
        if left <= 0:
            p.plan.delete_job = True
        else:
            p.plan.requeue_after = left
