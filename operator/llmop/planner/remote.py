"""storage.remote in status: what the rank-0 trainer's remote metrics and the stages' termination
messages say is in object storage, the RemoteSynced condition and its Events.

Pure over the typed status, like the rest of the planner: ``llmop.controller`` scrapes the figures
(``llmop.progress``) and calls ``scraped``; the training and compression phases call ``uploaded``
with what a finished stage's termination message says it uploaded.

RemoteSynced: True/UploadsCurrent when nothing saved is waiting for upload; False/UploadPending
while checkpoints are queued (normal after every save, so no Event); False/UploadFailed while the
trainer's latest attempt failed (a Warning Event on the way in, a Normal one on the way out). The
messages name the remote URI (which admission keeps free of credentials) and counts, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from llmop import conditions as cond
from llmop.planner.context import Event, JobSnapshot, Plan
from llmop_contract import remote as layout
from llmop_contract.api.v1alpha1.status import JobReason, RemoteStatus

# progress.parse's names for the trainer's remote metrics.
CHECKPOINT_STEP = "remoteCheckpointStep"
PENDING = "remoteUploadsPending"
FAILURES = "remoteUploadFailures"
FAILING = "remoteUploadFailing"


def remote_status(job: JobSnapshot, plan: Plan) -> RemoteStatus | None:
    """status.remote, created for a job with storage.remote (None without)."""
    remote = job.spec.storage.remote
    if remote is None:
        return None
    if plan.status.remote is None or plan.status.remote.uri != remote.uri:
        plan.status.remote = RemoteStatus(uri=remote.uri)
    return plan.status.remote


def scraped(job: JobSnapshot, plan: Plan, values: Mapping[str, float], now: datetime) -> None:
    """Take a scrape's remote figures into ``plan`` (a restore from remote storage is
    ``planner.resume``'s)."""
    status = remote_status(job, plan)
    if status is None or PENDING not in values:
        return  # no remote storage, or a trainer that has not set its uploader up yet
    step = int(values.get(CHECKPOINT_STEP, 0))
    if step > 0:
        status.checkpoint_step = step
        status.checkpoint_uri = layout.checkpoint_uri(status.uri, layout.checkpoint_tag(step))
    status.pending_uploads = max(0, int(values.get(PENDING, 0)))
    status.failed_uploads = max(0, int(values.get(FAILURES, 0)))
    status.update_time = cond.now_iso(now)
    if values.get(FAILING, 0) >= 1:
        message = (
            f"{status.failed_uploads} upload attempt(s) to {status.uri} failed; retrying with backoff"
            " (the checkpoints are kept on the volume until uploaded)"
        )
        synced(job, plan, now, JobReason.UPLOAD_FAILED, message)
    elif status.pending_uploads:
        message = f"{status.pending_uploads} checkpoint(s) being uploaded to {status.uri}"
        synced(job, plan, now, JobReason.UPLOAD_PENDING, message)
    else:
        where = f"step {status.checkpoint_step}" if status.checkpoint_step else "nothing saved yet"
        synced(job, plan, now, JobReason.UPLOADS_CURRENT, f"{status.uri} is current ({where})")


def uploaded(
    job: JobSnapshot, plan: Plan, now: datetime, model_uri: str | None, final_step: int | None = None
) -> None:
    """Training ended with exit 0: the trainer exits so only once every upload is complete (what
    could not be uploaded fails the run), so nothing is pending; ``model_uri`` is the export's.

    The last scrape predates the final checkpoint's upload; the trainer always checkpoints its last
    step, so ``final_step`` (from its termination message) is the newest checkpoint in the bucket.
    """
    status = remote_status(job, plan)
    if status is None:
        return
    status.pending_uploads = 0
    if final_step:
        status.checkpoint_step = final_step
        status.checkpoint_uri = layout.checkpoint_uri(status.uri, layout.checkpoint_tag(final_step))
    status.update_time = cond.now_iso(now)
    if model_uri:
        status.model_uri = model_uri
    what = f"the model is in {status.model_uri}" if status.model_uri else f"{status.uri} is current"
    synced(job, plan, now, JobReason.UPLOADS_CURRENT, f"training finished; {what}")


def synced(job: JobSnapshot, plan: Plan, now: datetime, reason: JobReason, message: str) -> None:
    """Set RemoteSynced; Events only for a failure starting (Warning) or ending (Normal): pending
    and current alternate with every checkpoint and would flood the job's Events."""
    before = cond.find(plan.status.conditions, cond.REMOTE_SYNCED)
    was_failing = before is not None and before.reason == JobReason.UPLOAD_FAILED
    good = reason == JobReason.UPLOADS_CURRENT
    cond.set_condition(plan.status.conditions, cond.REMOTE_SYNCED, good, reason, message, job.generation, now)
    failing = reason == JobReason.UPLOAD_FAILED
    if failing and not was_failing:
        plan.events.append(Event(JobReason.UPLOAD_FAILED, message, warning=True))
    elif was_failing and not failing:
        plan.events.append(Event(reason, f"uploads to the remote storage succeed again: {message}"))
