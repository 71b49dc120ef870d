"""Data preparation: one batch Job before training, when spec.data.prepare asks for it."""

from __future__ import annotations

from llmop import conditions as cond
from llmop.planner.context import PREPARE, Pass
from llmop.termination import refusal
from llmop_contract.api.v1alpha1.status import JobReason, JobState, StageState


def prepared(p: Pass) -> bool:
    """The data is prepared; otherwise the preparation Job is created, waited for, or has failed."""
    job = p.seen.prepare
    if job is None:
        p.plan.create_prepare = True
        p.stage(PREPARE, StageState.RUNNING)
        p.status.state = JobState.PREPARING
        return False
    if job.failed:
        # A refusal (exit 2: a missing source, malformed records) says what to fix; a crash has
        # only the Job's own message.
        why = refusal(p.seen.compress_pods, "") or job.message
        p.stage(PREPARE, StageState.FAILED, why)
        p.fail(JobReason.PREPARATION_FAILED, f"data preparation Job {job.name} failed: {why}")
        return False
    if not job.succeeded:
        blocked = p.config_blocked(cond.PREPARED, [x for x in p.seen.compress_pods if x.stage == ""])
        p.stage(PREPARE, StageState.RUNNING).message = blocked  # cleared once the pod can start
        p.status.state = JobState.PREPARING
        return False
    p.stage(PREPARE, StageState.SUCCEEDED)
    message = f"Job {job.name} prepared the data"
    p.condition(cond.PREPARED, True, JobReason.PREPARATION_SUCCEEDED, message)
    return True
