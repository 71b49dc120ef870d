"""Argo CD health checks (docs/gitops/argocd-cm-health.yaml) for the cases one job run cannot show,
and for LLMHyperparameterSearch objects whose status the apiserver validated against the real CRD.

The LLMTrainingJob verdicts on status the operator itself wrote are in test_release.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.helm import argocd
from tests.kube import Cluster


def job(status: dict[str, Any] | None, generation: int = 1, kind: str = "LLMTrainingJob") -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "llmop.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "j", "generation": generation},
    }
    if status is not None:
        obj["status"] = status
    return obj


def cond(type_: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message, "observedGeneration": 1}


def test_both_kinds_share_one_script_and_argocd_can_merge_it() -> None:
    data = yaml.safe_load(argocd.HEALTH_CHECKS.read_text())["data"]
    assert set(data) == {
        argocd.KEY.format(kind="LLMTrainingJob"),
        argocd.KEY.format(kind="LLMHyperparameterSearch"),
    }
    assert argocd.script("LLMTrainingJob") == argocd.script("LLMHyperparameterSearch")


@pytest.mark.parametrize(
    ("obj", "verdict"),
    [
        (
            job(None),
            {
                "status": "Progressing",
                "message": "Waiting for the llmop operator to accept the LLMTrainingJob",
            },
        ),
        # Spec edited (e.g. by a Git commit), the operator has not caught up: not healthy yet.
        (
            job({"state": "Running", "observedGeneration": 1}, generation=2),
            {"status": "Progressing", "message": "Waiting for the operator to observe generation 2"},
        ),
        (
            job(
                {
                    "state": "Pending",
                    "observedGeneration": 1,
                    "conditions": [
                        cond(
                            "GangScheduled",
                            "False",
                            "InsufficientCapacity",
                            "needs 5 nodes with 8 free nvidia.com/gpu; 4 available",
                        )
                    ],
                }
            ),
            {
                "status": "Progressing",
                "message": "Pending: needs 5 nodes with 8 free nvidia.com/gpu; 4 available",
            },
        ),
        (
            job(
                {
                    "state": "Suspended",
                    "observedGeneration": 1,
                    "conditions": [
                        cond(
                            "Suspended",
                            "True",
                            "Suspended",
                            "runPolicy.suspend is true: pods deleted, state kept",
                        )
                    ],
                }
            ),
            {"status": "Suspended", "message": "runPolicy.suspend is true: pods deleted, state kept"},
        ),
        (
            job(
                {
                    "state": "Succeeded",
                    "observedGeneration": 1,
                    "conditions": [
                        cond("Succeeded", "True", "TrainingSucceeded", "done"),
                        cond("Serving", "False", "Starting", "0/2 serving replicas ready"),
                    ],
                }
            ),
            {"status": "Progressing", "message": "Succeeded; serving: 0/2 serving replicas ready"},
        ),
        (
            job(
                {
                    "state": "Succeeded",
                    "observedGeneration": 1,
                    "conditions": [
                        cond("Succeeded", "True", "TrainingSucceeded", "done"),
                        cond(
                            "Serving",
                            "False",
                            "ServingUnavailable",
                            "serving.kserve is true but the KServe CRDs are not installed",
                        ),
                    ],
                }
            ),
            {
                "status": "Degraded",
                "message": "Succeeded; serving unavailable: serving.kserve is true but the KServe CRDs are not installed",
            },
        ),
        (
            job(
                {
                    "state": "Succeeded",
                    "observedGeneration": 1,
                    "conditions": [
                        cond("Succeeded", "True", "TrainingSucceeded", "done"),
                        cond(
                            "Serving",
                            "False",
                            "EngineCannotLoad",
                            "serving.engine VLLM cannot load stage quantize-int8's layout quantized",
                        ),
                    ],
                }
            ),
            {
                "status": "Degraded",
                "message": "Succeeded; serving unavailable: "
                "serving.engine VLLM cannot load stage quantize-int8's layout quantized",
            },
        ),
        # A finished job keeps its verdict even when its spec changed afterwards.
        (
            job(
                {
                    "state": "Failed",
                    "observedGeneration": 1,
                    "conditions": [
                        cond("Failed", "True", "DeadlineExceeded", "activeDeadlineSeconds passed")
                    ],
                },
                generation=3,
            ),
            {"status": "Degraded", "message": "DeadlineExceeded: activeDeadlineSeconds passed"},
        ),
    ],
    ids=[
        "no-status",
        "generation-ahead",
        "pending-capacity",
        "suspended",
        "serving-starting",
        "serving-unavailable",
        "serving-engine-cannot-load",
        "failed-then-edited",
    ],
)
def test_job_health_verdicts(obj: dict[str, Any], verdict: dict[str, str]) -> None:
    assert argocd.health(obj) == verdict


SEARCH_SPEC = {
    "trialTemplate": {
        "data": {"prepare": False, "sources": [{"uri": "builtin://english"}]},
        "training": {"maxSteps": 100},
    },
    "parameters": [
        {"name": "lr", "path": "training.optimizer.learningRate", "type": "Float", "min": 1e-4, "max": 1e-3}
    ],
    "maxTrials": 4,
}
TRIAL = {"index": 0, "name": "hp-000", "parameters": {"lr": 0.0003}, "state": "Succeeded", "value": 2.5}
SEARCH_STATUSES = {
    "Pending": (
        {
            "state": "Pending",
            "observedGeneration": 1,
            "conditions": [cond("Created", "True", "SearchCreated", "LLMHyperparameterSearch hp accepted")],
        },
        {"status": "Progressing", "message": "Pending"},
    ),
    "Running": (
        {
            "state": "Running",
            "observedGeneration": 1,
            "conditions": [
                cond("Created", "True", "SearchCreated", "accepted"),
                cond("Running", "True", "TrialsRunning", "2 trials running"),
            ],
            "counts": {"total": 3, "running": 2, "succeeded": 1, "finished": 1},
            "trials": [TRIAL],
            "bestTrial": {"name": "hp-000", "index": 0, "parameters": {"lr": 0.0003}, "value": 2.5},
        },
        {"status": "Progressing", "message": "Running: 1/3 trials finished, best hp-000 (2.5)"},
    ),
    "Succeeded": (
        {
            "state": "Succeeded",
            "observedGeneration": 1,
            "conditions": [
                cond("Running", "False", "SearchSucceeded", "4 trials"),
                cond(
                    "Succeeded", "True", "SearchSucceeded", "best hp-000: validation loss 2.5 after 4 trials"
                ),
            ],
            "counts": {"total": 4, "succeeded": 4, "finished": 4},
        },
        {"status": "Healthy", "message": "best hp-000: validation loss 2.5 after 4 trials"},
    ),
    "Failed": (
        {
            "state": "Failed",
            "observedGeneration": 1,
            "conditions": [
                cond("Failed", "True", "TooManyFailedTrials", "4 trials failed; maxFailedTrials is 3")
            ],
            "counts": {"total": 4, "failed": 4, "finished": 4},
        },
        {"status": "Degraded", "message": "TooManyFailedTrials: 4 trials failed; maxFailedTrials is 3"},
    ),
}


@pytest.mark.cluster
def test_search_health_on_objects_the_apiserver_validated(cluster: Cluster, namespace: str) -> None:
    # Each status goes through the real CRD's /status subresource (schema, enums, types enforced),
    # and the health check reads the object back as Argo CD would get it from the apiserver.
    manifest = {
        "apiVersion": "llmop.io/v1alpha1",
        "kind": "LLMHyperparameterSearch",
        "metadata": {"name": "hp"},
        "spec": SEARCH_SPEC,
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))
    for state, (status, verdict) in SEARCH_STATUSES.items():
        cluster.kubectl(
            "patch",
            "llmhyperparametersearch",
            "hp",
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(
                {
                    "status": {
                        **status,
                        "conditions": [
                            {**c, "lastTransitionTime": "2026-01-01T00:00:00Z"} for c in status["conditions"]
                        ],
                    }
                }
            ),
        )
        stored = cluster.kubectl_json("get", "llmhyperparametersearch", "hp", "-n", namespace)
        assert stored["status"]["state"] == state
        assert argocd.health(stored) == verdict, state
