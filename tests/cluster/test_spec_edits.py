"""Spec edits the apiserver refuses once they could no longer take effect, and those it lets through.

No operator runs here: the job's status is written directly (as the operator would), so each case
is in exactly the state it is named after.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cluster.conftest import Jobs
from tests.kube import Cluster

pytestmark = pytest.mark.cluster
COMPRESSION = {"quantization": [{"method": "Int8WeightOnly"}]}


def _set_status(cluster: Cluster, ns: str, name: str, status: dict[str, Any]) -> None:
    body = json.dumps({"status": status})
    cluster.kubectl(
        "patch", "llmtrainingjob", name, "-n", ns, "--subresource=status", "--type=merge", "-p", body
    )


def _patch(cluster: Cluster, ns: str, name: str, spec: dict[str, Any]) -> str:
    """The apiserver's refusal (stderr), or "" when the patch was accepted."""
    out = cluster.kubectl(
        "patch",
        "llmtrainingjob",
        name,
        "-n",
        ns,
        "--type=merge",
        "-p",
        json.dumps({"spec": spec}),
        check=False,
    )
    return "" if out.returncode == 0 else out.stderr


def _trained(when: str) -> dict[str, Any]:
    return {
        "state": "Compressing",
        "conditions": [
            {"type": "Trained", "status": when, "reason": "TrainingSucceeded", "message": "",
             "lastTransitionTime": "2026-12-02T08:00:00Z"},
        ],
    }  # fmt: skip


def test_compression_is_editable_until_training_finishes_then_frozen(
    cluster: Cluster, namespace: str, jobs: Jobs
) -> None:
    jobs.create("edits", compression=COMPRESSION)
    # Training not finished (no status yet, then Trained=False): the stages are not planned yet.
    assert (
        _patch(
            cluster,
            namespace,
            "edits",
            {"compression": {"pruning": [{"method": "Magnitude", "sparsity": 0.5}]}},
        )
        == ""
    )
    _set_status(cluster, namespace, "edits", _trained("False"))
    assert _patch(cluster, namespace, "edits", {"compression": COMPRESSION}) == ""

    _set_status(cluster, namespace, "edits", _trained("True"))
    refused = _patch(cluster, namespace, "edits", {"compression": {"backoffLimit": 5}})
    assert "spec.compression cannot change once training has finished" in refused, refused
    refused = _patch(cluster, namespace, "edits", {"compression": None})
    assert "spec.compression cannot change once training has finished" in refused, refused
    # What a finished job still acts on stays editable.
    assert _patch(cluster, namespace, "edits", {"serving": {"enabled": True}}) == ""
    assert _patch(cluster, namespace, "edits", {"runPolicy": {"ttlSecondsAfterFinished": 60}}) == ""
    # The status itself can still be written (the operator's patches go through /status).
    _set_status(cluster, namespace, "edits", {"state": "Succeeded"})


def test_a_job_without_compression_cannot_gain_it_after_training(
    cluster: Cluster, namespace: str, jobs: Jobs
) -> None:
    jobs.create("late")
    _set_status(cluster, namespace, "late", _trained("True"))
    refused = _patch(cluster, namespace, "late", {"compression": COMPRESSION})
    assert "spec.compression cannot change once training has finished" in refused, refused
