"""Elastic gangs (``workers.minNodes``/``maxNodes``): when a gang shrinks and when it grows.

Every attempt is a fixed-size gang (its pods say NNODES); a resize is a restart at another size from
the last checkpoint, decided here, counted neither as a failure nor as a disruption, recorded in
``status.resizes`` with an Event. Kubeflow v1's elasticPolicy let torchrun re-form a gang in place;
here the operator holds the capacity view (``capacity``) that says which size fits, so it re-forms
the gang itself and the trainer re-shards the ZeRO state (universal checkpoint) and the data
position for the new world.

- Shrink: the attempt's gang does not fit whole (held by the operator's gate) for
  ``resizeGraceSeconds``: it restarts at the largest allowed size that fits, never below minNodes.
- Grow: a running gang below the largest allowed size sees room for more workers for
  ``resizeGraceSeconds``: its pods are deleted with their grace period, so the trainer checkpoints
  at the next step boundary (SIGTERM) and the larger gang resumes from that step; nothing is redone.

Allowed sizes keep ``globalBatchSize`` exactly by gradient accumulation
(``LLMTrainingJobSpec.elastic_sizes``); a size between minNodes and maxNodes that does not divide it
is skipped. Decisions need the operator's own capacity view, so they are made for gangs the operator
gates itself (no Kueue, Volcano or coscheduling: those hold the gang until it fits whole).
"""

from __future__ import annotations

from llmop import conditions as cond
from llmop.capacity import Fit
from llmop.planner.context import Event, Pass
from llmop_contract.api.v1alpha1.status import MAX_RESIZES, JobReason, JobState, Resize

RECHECK_SECONDS = 2.0


def size_within(p: Pass, room: int) -> int | None:
    """The largest allowed size of at most ``room`` nodes, if any."""
    return next((n for n in p.job.spec.elastic_sizes() if n <= room), None)


def _waited(p: Pass) -> float:
    """Seconds since the gang could have run at another size (starting the clock now if unset)."""
    if p.status.capacity_short_since is None:
        p.status.capacity_short_since = p.now
    return (p.seen.now - cond.parse_time(p.status.capacity_short_since)).total_seconds()


def _grace_left(p: Pass) -> float:
    left = p.spec.workers.resize_grace_seconds - _waited(p)
    if left > 0:
        p.plan.requeue_after = min(RECHECK_SECONDS, left)
    return left


def shrink(p: Pass, attempt: int, fit: Fit) -> bool:
    """The gang does not fit whole: shrink it once the grace period is over; True if it did."""
    if not p.spec.workers.elastic:
        return False
    size = size_within(p, min(fit.feasible_nodes, p.spec.workers.num_nodes - 1))
    if size is None:
        return False
    if _grace_left(p) > 0:
        return False
    why = f"{fit.message}; waited {p.spec.workers.resize_grace_seconds}s for capacity"
    resize(p, attempt, size, JobReason.GANG_SHRUNK, why)
    return True


def grow(p: Pass, attempt: int, room: int | None) -> bool:
    """A running gang with ``room`` more nodes free: grow once that held for the grace period."""
    current = p.spec.workers.num_nodes
    size = size_within(p, current + room) if room else None
    if not p.spec.workers.elastic or room is None or size is None or size <= current:
        p.status.capacity_short_since = None
        return False
    if _grace_left(p) > 0:
        return False
    resize(
        p,
        attempt,
        size,
        JobReason.GANG_GROWN,
        f"room for {room} more {'node' if room == 1 else 'nodes'}, one worker each",
    )
    return True


def _nodes(n: int) -> str:
    return f"{n} node" if n == 1 else f"{n} nodes"


def resize(p: Pass, attempt: int, size: int, reason: JobReason, why: str) -> None:
    before = p.spec.workers.num_nodes
    message = f"{why}: restarting the gang on {_nodes(size)} (was {before}) as attempt {attempt + 1}"
    p.status.resizes = [
        *p.status.resizes,
        Resize(
            time=p.now, from_nodes=before, to_nodes=size, attempt=attempt + 1, reason=reason, message=message
        ),
    ][-MAX_RESIZES:]
    p.interrupted(attempt, reason)
    p.status.attempt = attempt + 1
    p.status.current_nodes = size
    p.status.capacity_short_since = None
    p.delete_all_pods()
    # Shrinking is a Warning: the job runs slower than asked until it grows back.
    shrunk = reason == JobReason.GANG_SHRUNK
    p.plan.events.append(Event(reason, message, warning=shrunk, key=f"attempt-{attempt + 1}"))
    p.condition(cond.RUNNING, False, reason, message)
    p.condition(cond.RESTARTING, True, reason, message)
    p.status.state = JobState.RESTARTING
