"""Status conditions per the Kubernetes API conventions.

lastTransitionTime moves only when a condition's status changes; reason and message may be updated
in place. Every change is reported back so the caller can post one Event per transition.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from llmop_contract.api.v1alpha1.status import Condition, ConditionStatus

CREATED = "Created"
PREPARED = "DataPrepared"
GANG_SCHEDULED = "GangScheduled"
RUNNING = "Running"
RESTARTING = "Restarting"
SUSPENDED = "Suspended"
TRAINED = "Trained"
COMPRESSED = "Compressed"
SERVING = "Serving"
OUTPUT_SELECTED = "OutputSelected"
# One condition per post-training stage, in the "domain/name" form the conventions allow for extensions.
STAGE_PREFIX = "stage.llmop.io/"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
# Whether the last reconcile pass was carried out (Crossplane's convention): False carries the API's
# message, so an error is visible on the job and not only in the operator's log.
SYNCED = "Synced"
# Whether everything saved so far is in storage.remote (jobs with storage.remote only; see
# ``planner.remote``): UploadsCurrent, UploadPending, UploadFailed.
REMOTE_SYNCED = "RemoteSynced"

WireCondition = dict[str, Any]  # a condition as a manifest shows it (what tests and kubectl read)


def now_iso(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class Transition:
    type: str
    status: str
    reason: str
    message: str


# --- typed conditions (status models), as the planners keep them ---------------------------------


def find(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def holds(conditions: list[Condition], type_: str) -> bool:
    """The condition is there and True."""
    c = find(conditions, type_)
    return c is not None and c.status == ConditionStatus.TRUE


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> Transition | None:
    """Set a condition in place; returns the transition when its status changed, else None."""
    wanted = ConditionStatus.TRUE if status else ConditionStatus.FALSE
    current = find(conditions, type_)
    transition = Transition(type_, wanted.value, str(reason), message)
    if current is None:
        conditions.append(
            Condition(
                type=type_,
                status=wanted,
                reason=str(reason),
                message=message,
                last_transition_time=now_iso(now),
                observed_generation=generation,
            )
        )
        # A condition appearing as False is not a transition worth an Event.
        return transition if status else None
    current.reason, current.message, current.observed_generation = str(reason), message, generation
    if current.status == wanted:
        return None
    current.status, current.last_transition_time = wanted, now_iso(now)
    return transition


# --- wire conditions (manifests) ------------------------------------------------------------------


def get(conditions: list[WireCondition], type_: str) -> WireCondition | None:
    return next((c for c in conditions if c["type"] == type_), None)


def is_true(conditions: list[WireCondition], type_: str) -> bool:
    c = get(conditions, type_)
    return c is not None and c["status"] == "True"
