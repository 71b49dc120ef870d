"""status.resume and its Events (planner.resume): how an attempt got its checkpoint, said once per
attempt whether the operator saw it in a scrape of the trainer's metrics, in the termination message
of an attempt that ended between two scrapes, or both."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from llmop import planner, progress
from llmop.planner import JobSnapshot, Observed, resume
from llmop_contract.api.v1alpha1.status import LLMTrainingJobStatus
from llmop_contract.protocol import Metric, TerminationMessage
from tests.unit.test_planner import NOW, pod
from tests.unit.test_planner_remote import URI, snapshot, spec


def metrics(step: int, fallbacks: int = 0, from_remote: int = 0) -> dict[str, float]:
    text = (
        f"{Metric.STEP} {step + 3}\n{Metric.RESUMED_FROM_STEP} {step}\n"
        f"{Metric.CHECKPOINT_FALLBACKS} {fallbacks}\n{Metric.RESUMED_FROM_REMOTE} {from_remote}\n"
    )
    return progress.parse(text)


def scraped(job: JobSnapshot, values: dict[str, float]) -> planner.Plan:
    """A pass over the running gang, then what the controller adds to it after a scrape."""
    result = planner.plan(
        job, Observed([pod(0, attempt=job.status.attempt), pod(1, attempt=job.status.attempt)], None, NOW)
    )
    resume.report(job, result, result.status.attempt, resume.Resumed.scraped(values))
    return result


def finished(job: JobSnapshot, message: dict[str, Any]) -> planner.Plan:
    """A pass that sees the gang's pods exit 0, rank 0 with ``message``."""
    attempt = job.status.attempt
    done = [
        replace(
            pod(i, attempt=attempt, phase="Succeeded", exit_code=0),
            termination_message=json.dumps(message) if i == 0 else "",
        )
        for i in range(2)
    ]
    return planner.plan(job, Observed(done, None, NOW))


def reasons(result: planner.Plan) -> list[tuple[str, bool]]:
    return [
        (e.reason, e.warning)
        for e in result.events
        if e.reason in ("ResumedFromRemote", "CheckpointFallback")
    ]


def running(attempt: int = 1) -> JobSnapshot:
    job = snapshot(spec())
    first = planner.plan(job, Observed([pod(0, attempt=attempt), pod(1, attempt=attempt)], None, NOW))
    status = first.status.model_copy(update={"attempt": attempt})
    return replace(job, status=status)


TRAINED = {"step": 40, "totalSteps": 40, "modelPath": "/var/lib/llmop/output/model"}


def test_an_attempt_that_ends_between_scrapes_reports_its_restore_from_its_termination_message() -> None:
    job = running()
    after = finished(
        job, {**TRAINED, "resumedFromStep": 10, "checkpointFallbacks": 0, "resumedFromRemote": True}
    )
    assert reasons(after) == [("ResumedFromRemote", False)]
    [event] = [e for e in after.events if e.reason == "ResumedFromRemote"]
    assert "step 10" in event.message and URI in event.message
    assert after.status.resume is not None
    assert (after.status.resume.attempt, after.status.resume.step, after.status.resume.from_remote) == (
        1,
        10,
        True,
    )


def test_a_restore_seen_by_a_scrape_and_again_at_the_end_is_said_once() -> None:
    job = running()
    first = scraped(job, metrics(10, from_remote=1))
    assert reasons(first) == [("ResumedFromRemote", False)]
    again = scraped(replace(job, status=first.status), metrics(10, from_remote=1))
    assert reasons(again) == []
    end = finished(
        replace(job, status=again.status), {**TRAINED, "resumedFromStep": 10, "resumedFromRemote": True}
    )
    assert reasons(end) == []
    # The status carries it: an operator restarted meanwhile says nothing again either.
    wire = LLMTrainingJobStatus.model_validate(end.status.to_wire())
    assert (
        reasons(
            finished(replace(job, status=wire), {**TRAINED, "resumedFromStep": 10, "resumedFromRemote": True})
        )
        == []
    )


def test_each_attempt_that_restores_is_reported() -> None:
    first = scraped(running(1), metrics(10, from_remote=1))
    second_job = replace(running(2), status=first.status.model_copy(update={"attempt": 2}))
    second = scraped(second_job, metrics(20, from_remote=1))
    assert reasons(second) == [("ResumedFromRemote", False)]
    assert second.status.resume is not None and (second.status.resume.attempt, second.status.resume.step) == (
        2,
        20,
    )


def test_fallbacks_are_a_warning_naming_where_training_went_on() -> None:
    result = scraped(running(), metrics(100, fallbacks=1))
    assert reasons(result) == [("CheckpointFallback", True)]
    assert (
        "1 checkpoint(s) failed verification" in result.events[-1].message
        and "step 100" in result.events[-1].message
    )
    scratch = finished(running(), {**TRAINED, "resumedFromStep": 0, "checkpointFallbacks": 2})
    [event] = [e for e in scratch.events if e.reason == "CheckpointFallback"]
    assert "2 checkpoint(s)" in event.message and "started from scratch" in event.message


def test_a_first_start_or_a_plain_resume_from_the_volume_says_nothing() -> None:
    fresh = scraped(running(), metrics(0))
    assert reasons(fresh) == [] and fresh.status.resume is None
    plain = scraped(running(), metrics(30))
    assert reasons(plain) == []
    assert plain.status.resume is not None and (
        plain.status.resume.step,
        plain.status.resume.from_remote,
    ) == (30, False)
    # Before the trainer restored anything its metrics have no resume figures at all.
    assert scraped(running(), progress.parse(f"{Metric.STEP} 0\n")).status.resume is None


def test_the_termination_message_keeps_only_well_formed_resume_fields() -> None:
    good = TerminationMessage.decode(
        json.dumps({"resumedFromStep": 10, "checkpointFallbacks": 1, "resumedFromRemote": True})
    )
    assert (good.resumed_from_step, good.checkpoint_fallbacks, good.resumed_from_remote) == (10, 1, True)
    bad = TerminationMessage.decode(
        json.dumps({"resumedFromStep": "ten", "checkpointFallbacks": None, "resumedFromRemote": "yes"})
    )
    assert (bad.resumed_from_step, bad.checkpoint_fallbacks, bad.resumed_from_remote) == (None, None, None)
    assert resume.Resumed.terminated(bad) is None
    assert TerminationMessage.decode(good.encode()) == good
