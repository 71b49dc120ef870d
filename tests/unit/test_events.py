"""Events the operator posts itself: one per restart whatever crashes or fails around it.

A fake API (a list of answers) is enough here: what is under test is the retry and naming rule; the
chaos test (tests/cluster/test_chaos.py) proves it against a real apiserver behind a faulty proxy.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ProtocolError

from llmop import events
from llmop.kube import Kube
from tests.unit.test_planner import NOW, Observed, plan, pod, running_status, snapshot, spec

JOB = {
    "apiVersion": "llmop.io/v1alpha1",
    "kind": "LLMTrainingJob",
    "metadata": {"name": "j", "namespace": "ns", "uid": "1234-abcd"},
}


class FakeCore:
    """CoreV1Api's create_namespaced_event answering from a script (an exception or None each)."""

    def __init__(self, *answers: BaseException | None) -> None:
        self.answers, self.created = list(answers), list[dict[str, Any]]()

    def create_namespaced_event(self, namespace: str, body: dict[str, Any], **options: Any) -> None:
        # Without it the client sends no Content-Type; behind a proxy the apiserver then says 415.
        assert options.get("_headers") == {"Content-Type": "application/json"}
        answer = self.answers.pop(0) if self.answers else None
        if answer is not None:
            raise answer
        names = [e["metadata"].get("name") for e in self.created]
        if body["metadata"].get("name") in names:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(body)


def kube_with(core: FakeCore) -> Kube:
    kube = Kube.__new__(Kube)
    kube.core = core  # type: ignore[assignment]
    return kube


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "BACKOFFS", (0.0, 0.0, 0.0))


def post(core: FakeCore, key: str | None = None, warning: bool = True) -> None:
    asyncio.run(events.post(kube_with(core), JOB, "WorkerFailed", "worker j-worker-1 failed", warning, key))


def test_transient_errors_are_retried_until_the_event_is_posted() -> None:
    core = FakeCore(
        ApiException(status=500), ApiException(status=429), ProtocolError("connection reset"), None
    )
    post(core)
    [event] = core.created
    assert event["type"] == "Warning" and event["reason"] == "WorkerFailed"
    assert event["involvedObject"] == {
        "apiVersion": "llmop.io/v1alpha1", "kind": "LLMTrainingJob", "name": "j", "namespace": "ns",
        "uid": "1234-abcd",
    }  # fmt: skip
    assert event["metadata"]["generateName"] == "j."


def test_a_keyed_event_posted_twice_exists_once() -> None:
    core = FakeCore()
    post(core, key="attempt-2")
    post(core, key="attempt-2")  # the pass repeated after a crash or a failed status write
    post(core, key="attempt-3")
    assert [e["metadata"]["name"] for e in core.created] == [
        events.event_name(JOB, "attempt-2"),
        events.event_name(JOB, "attempt-3"),
    ]
    other_job = {**JOB, "metadata": {**JOB["metadata"], "uid": "9999"}}  # same name, recreated
    assert events.event_name(other_job, "attempt-2") != events.event_name(JOB, "attempt-2")


def test_a_keyed_event_that_cannot_be_posted_fails_the_pass() -> None:
    core = FakeCore(*[ApiException(status=503)] * 10)
    with pytest.raises(events.EventNotPosted, match="attempt-2"):
        post(core, key="attempt-2")
    assert core.created == []


def test_an_unkeyed_event_the_api_refuses_is_dropped_without_failing_the_pass() -> None:
    post(FakeCore(*[ApiException(status=503)] * 10))  # retries spent: logged, dropped
    core = FakeCore(ApiException(status=403))
    post(core, key="attempt-2")  # no RBAC for events: retrying cannot help, nor failing the pass
    assert core.created == []


def test_long_messages_are_cut_to_what_the_apiserver_accepts() -> None:
    long = "x" * 5000
    event = events.manifest(JOB, "WorkerFailed", long, warning=True)
    assert len(event["message"]) <= events.MAX_MESSAGE and "..." in event["message"]


def test_each_restart_plans_one_keyed_event_even_while_restarting_is_still_true() -> None:
    failed = plan(
        snapshot(spec(), running_status()), Observed([pod(0), pod(1, phase="Failed", exit_code=1)], None, NOW)
    )
    [first] = [e for e in failed.events if e.key]
    assert (first.reason, first.key) == ("WorkerFailed", "attempt-2")
    # The new gang's worker fails before the gang ever ran: Restarting stays True (no transition).
    starting = plan(snapshot(spec(), failed.status), Observed([], None, NOW))
    seen = Observed(
        [pod(0, attempt=2, phase="Pending"), pod(1, attempt=2, phase="Failed", exit_code=1)], None, NOW
    )
    again = plan(snapshot(spec(), starting.status), seen)
    assert again.status["restartCount"] == 2
    assert [(e.reason, e.key) for e in again.events if e.key] == [("WorkerFailed", "attempt-3")]
    # Replayed on the same evidence (the status write failed): the same key, so no second Event.
    replay = plan(snapshot(spec(), starting.status), seen)
    assert [e.key for e in replay.events if e.key] == ["attempt-3"]
