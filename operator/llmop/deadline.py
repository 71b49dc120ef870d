"""One deadline rule for jobs (runPolicy.activeDeadlineSeconds) and searches (deadlineSeconds).

Measured from the start time the operator recorded in status, by the clock of the pass that
observes it (never the wall clock at call time), so a planner stays pure and replayable:

    left = deadline.remaining(status.start_time, limit, seen.now)
    if left is None: ...          # no deadline
    elif left > 0: requeue_after = left
    else: fail(..., deadline.message("job", "activeDeadlineSeconds", limit))
"""

from __future__ import annotations

from datetime import datetime

from llmop.conditions import parse_time


def _start(started: datetime | str | None) -> datetime | None:
    return parse_time(started) if isinstance(started, str) else started


def remaining(started: datetime | str | None, limit_seconds: int | None, now: datetime) -> float | None:
    """Seconds left before the deadline (<= 0: exceeded); None when there is no deadline.

    ``started`` is a datetime or the RFC 3339 form status stores; not started yet counts as now.
    """
    if limit_seconds is None:
        return None
    start = _start(started) or now
    return limit_seconds - (now - start).total_seconds()


def exceeded(started: datetime | str | None, limit_seconds: int | None, now: datetime) -> bool:
    left = remaining(started, limit_seconds, now)
    return left is not None and left <= 0


def message(subject: str, field: str, limit_seconds: int) -> str:
    """The failure message both kinds report, e.g. "job ran longer than activeDeadlineSeconds=600"."""
    return f"{subject} ran longer than {field}={limit_seconds}"
