"""Trials of one search share a template: each uploads under a remote prefix of its own."""

from __future__ import annotations

from llmop.search import builders

REF = builders.SearchRef("sweep", "team", "uid-s")
SPEC = {
    "training": {"maxSteps": 10},
    "storage": {"remote": {"uri": "s3://runs/sweep/", "maxPendingUploads": 2}},
}


def test_each_trial_and_the_best_job_upload_under_their_own_name() -> None:
    uris = [
        builders.build_trial(REF, i, {"lr": 0.1}, SPEC)["spec"]["storage"]["remote"]["uri"] for i in range(3)
    ]
    best = builders.build_best(REF, {"lr": 0.1}, SPEC)["spec"]["storage"]["remote"]["uri"]
    assert uris == ["s3://runs/sweep/sweep-000", "s3://runs/sweep/sweep-001", "s3://runs/sweep/sweep-002"]
    assert best == "s3://runs/sweep/sweep-best"
    assert SPEC["storage"]["remote"]["uri"] == "s3://runs/sweep/", "the template is not changed"


def test_a_trial_without_remote_storage_is_left_as_it_is() -> None:
    spec = {"training": {"maxSteps": 10}, "storage": {"size": "1Gi"}}
    assert builders.build_trial(REF, 0, {}, spec)["spec"] == spec
