"""What a failed reconcile pass leaves in the job's status: the ``Synced`` condition, or a failure.

The pass that hit the error acted only in part, so its own plan is dropped and this one is built
over the status as it was before the pass (every action is idempotent: the next pass redoes the
rest). Retrying cannot fix a child the apiserver refused (422, 400) or may not be created (403), nor
a name held by an object the job does not own: those fail the job with the API's own message. Any
other error (429, 5xx, timeouts, a ResourceQuota's 403 "exceeded quota", a leftover of an earlier job of the same name still being removed)
is reported on ``Synced`` and retried with backoff.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from llmop import conditions as cond
from llmop.planner.context import JobSnapshot, Observed, Pass, Plan
from llmop_contract.api.v1alpha1.status import JobReason

# Retries of a transient error back off exponentially up to this (the API is down, or overloaded).
MAX_BACKOFF_SECONDS = 60.0
# A leftover is being deleted by us: its removal is an event away, so look again soon.
LEFTOVER_RECHECK_SECONDS = 1.0
# Quota frees up without any event on the job's children (another job's pods end): look again at
# least this often, however long the quota has been exhausted.
QUOTA_RECHECK_SECONDS = 10.0


class ProblemKind(StrEnum):
    PERMANENT = "permanent"
    LEFTOVER = "leftover"
    TRANSIENT = "transient"


@dataclass(frozen=True)
class Problem:
    kind: ProblemKind
    reason: JobReason
    message: str


def backoff(streak: int) -> float:
    """Seconds before retry number ``streak`` (1, 2, 4, ... capped)."""
    return min(MAX_BACKOFF_SECONDS, 2.0 ** max(0, streak - 1))


def reconciled(job: JobSnapshot, plan: Plan, seen: Observed) -> None:
    """A pass carried out in full: Synced is True (and an Event says so when it was False)."""
    had = cond.find(plan.status.conditions, cond.SYNCED)
    t = cond.set_condition(
        plan.status.conditions,
        cond.SYNCED,
        True,
        JobReason.RECONCILED,
        "the job's children match its spec",
        job.generation,
        seen.now,
    )
    if t and had is not None:  # a first Synced=True is no news: only a recovery is
        plan.transitions.append(t)


def act_failed(job: JobSnapshot, seen: Observed, problem: Problem, streak: int) -> Plan:
    """The plan after a pass whose actions failed with ``problem`` (the ``streak``-th in a row)."""
    p = Pass(job, seen)
    if problem.kind == ProblemKind.PERMANENT:
        p.condition(cond.SYNCED, False, problem.reason, problem.message)
        p.fail(problem.reason, problem.message)
        return p.plan
    p.condition(cond.SYNCED, False, problem.reason, problem.message)
    if problem.kind == ProblemKind.LEFTOVER:
        p.plan.requeue_after = LEFTOVER_RECHECK_SECONDS
    elif problem.reason == JobReason.QUOTA_EXCEEDED:
        p.plan.requeue_after = min(backoff(streak), QUOTA_RECHECK_SECONDS)
    else:
        p.plan.requeue_after = backoff(streak)
    # Only the condition may go out: the pass's other decisions were not carried out.
    p.plan.delete_pods, p.plan.delete_batch_jobs = [], []
    return p.plan
