"""status.resume and its Events: how an attempt got its checkpoint, said once per attempt.

Two readings feed it: the rank-0 trainer's metrics while the attempt runs (``llmop.controller``
scrapes them at a bounded rate) and its termination message when training ends. An attempt that
resumes and finishes between two scrapes is seen only by the second; one seen by both is reported
by the first. The attempt reported is kept in status, so neither a later scrape nor an operator
restart says it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from llmop.planner.context import Event, JobSnapshot, Plan
from llmop_contract.api.v1alpha1.status import JobReason, ResumeStatus
from llmop_contract.protocol import TerminationMessage

# progress.parse's names for the trainer's resume metrics.
STEP = "resumedFromStep"
FALLBACKS = "checkpointFallbacks"
FROM_REMOTE = "resumedFromRemote"


@dataclass(frozen=True)
class Resumed:
    step: int
    fallbacks: int
    from_remote: bool

    @classmethod
    def scraped(cls, values: Mapping[str, float]) -> Resumed | None:
        if STEP not in values:
            return None  # a trainer that has not restored yet
        return cls(
            max(0, int(values[STEP])),
            max(0, int(values.get(FALLBACKS, 0))),
            values.get(FROM_REMOTE, 0) >= 1,
        )

    @classmethod
    def terminated(cls, message: TerminationMessage) -> Resumed | None:
        if message.resumed_from_step is None:
            return None  # a trainer older than this field, or a message cut short
        return cls(
            max(0, message.resumed_from_step),
            max(0, message.checkpoint_fallbacks or 0),
            bool(message.resumed_from_remote),
        )

    @property
    def afresh(self) -> bool:
        return self.step == 0 and self.fallbacks == 0 and not self.from_remote


def report(job: JobSnapshot, plan: Plan, attempt: int, resumed: Resumed | None) -> None:
    """Record how ``attempt`` resumed in status.resume, with its Events, unless already recorded."""
    if resumed is None or resumed.afresh or attempt < 1:
        return
    if plan.status.resume is not None and plan.status.resume.attempt >= attempt:
        return
    plan.status.resume = ResumeStatus(
        attempt=attempt, step=resumed.step, from_remote=resumed.from_remote, fallbacks=resumed.fallbacks
    )
    if resumed.fallbacks:
        plan.events.append(Event(JobReason.CHECKPOINT_FALLBACK, fallback_message(resumed), warning=True))
    if resumed.from_remote:
        plan.events.append(Event(JobReason.RESUMED_FROM_REMOTE, remote_message(job, resumed.step)))


def fallback_message(resumed: Resumed) -> str:
    where = f"resumed from the checkpoint of step {resumed.step}" if resumed.step else "started from scratch"
    return (
        f"{resumed.fallbacks} checkpoint(s) failed verification (truncated or corrupt) and were set aside;"
        f" training {where}"
    )


def remote_message(job: JobSnapshot, step: int) -> str:
    remote, resume_from = job.spec.storage.remote, job.spec.training.checkpointing.resume_from
    if remote is not None and resume_from is None:
        where = f"storage.remote ({remote.uri})"
    elif remote is None and resume_from is not None:
        where = f"training.checkpointing.resumeFrom ({resume_from})"
    elif remote is not None and resume_from is not None:
        where = f"storage.remote ({remote.uri}) or else training.checkpointing.resumeFrom ({resume_from})"
    else:
        where = "remote storage"
    return f"the volume had no usable checkpoint: restored the checkpoint of step {step} from {where}"
