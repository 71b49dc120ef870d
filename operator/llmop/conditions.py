"""Status conditions per the Kubernetes API conventions.

lastTransitionTime moves only when a condition's status changes; reason and message may be updated
in place. Every change is reported back so the caller can post one Event per transition.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

CREATED = "Created"
PREPARED = "DataPrepared"
GANG_SCHEDULED = "GangScheduled"
RUNNING = "Running"
RESTARTING = "Restarting"
SUSPENDED = "Suspended"
TRAINED = "Trained"
COMPRESSED = "Compressed"
SERVING = "Serving"
# One condition per post-training stage, in the "domain/name" form the conventions allow for extensions.
STAGE_PREFIX = "stage.llmop.io/"
SUCCEEDED = "Succeeded"
FAILED = "Failed"

Condition = dict[str, Any]


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


def get(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c["type"] == type_), None)


def is_true(conditions: list[Condition], type_: str) -> bool:
    c = get(conditions, type_)
    return c is not None and c["status"] == "True"


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
    wanted = "True" if status else "False"
    current = get(conditions, type_)
    fresh: Condition = {
        "type": type_,
        "status": wanted,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now_iso(now),
        "observedGeneration": generation,
    }
    if current is None:
        conditions.append(fresh)
        # A condition appearing as False is not a transition worth an Event.
        return Transition(type_, wanted, reason, message) if status else None
    if current["status"] == wanted:
        current.update(reason=reason, message=message, observedGeneration=generation)
        return None
    current.update(fresh)
    return Transition(type_, wanted, reason, message)
