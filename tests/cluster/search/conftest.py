"""Fixtures for searches on the real cluster: an operator per test and kubectl-level helpers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import OperatorProcess
from tests.kube import Cluster, wait_for

EXIT_AFTER = "llmop.io/kwok-exit-after"
EXIT_CODE = "llmop.io/kwok-exit-code"
MESSAGE = "llmop.io/kwok-termination-message"


def kwok_template(**annotations: str) -> dict[str, Any]:
    """A one-pod trial on the fake GPU nodes; its worker ends as the annotations script it."""
    return {
        "data": {"prepare": False},
        "training": {"maxSteps": 100, "globalBatchSize": 8, "microBatchSize": 1},
        "workers": {"numNodes": 1, "procsPerNode": 1, "gpusPerNode": 1, "podAnnotations": annotations},
    }


def finishes(value: float = 3.2, after: str = "2s") -> dict[str, str]:
    """Worker annotations of a trial that trains to the end and reports ``value`` as its loss."""
    message = {"stage": "train", "step": 100, "totalSteps": 100, "validationLoss": value}
    return {EXIT_AFTER: after, MESSAGE: json.dumps(message)}


class Searches:
    """kubectl-level helpers for LLMHyperparameterSearches in one namespace."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster, self.ns = cluster, namespace

    def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        manifest = {
            "apiVersion": "llmop.io/v1alpha1",
            "kind": "LLMHyperparameterSearch",
            "metadata": {"name": name},
            "spec": spec,
        }
        self.cluster.kubectl("apply", "-n", self.ns, "-f", "-", input=yaml.safe_dump(manifest))
        return manifest

    def get(self, name: str) -> dict[str, Any]:
        return dict(self.cluster.kubectl_json("get", "llmhyperparametersearch", name, "-n", self.ns))

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), None)

    def wait_condition(self, name: str, type_: str, timeout: float = 120) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            c = self.condition(name, type_)
            return c if c and c["status"] == "True" else None

        return dict(wait_for(check, timeout=timeout, interval=1, what=f"{name} condition {type_}=True"))

    def jobs(self, name: str) -> list[dict[str, Any]]:
        """The search's child LLMTrainingJobs."""
        items = self.cluster.kubectl_json(
            "get", "llmtrainingjobs", "-n", self.ns, "-l", f"llmop.io/search-name={name}"
        )["items"]
        return sorted(items, key=lambda j: j["metadata"]["name"])

    def events(self, name: str) -> list[dict[str, Any]]:
        selector = f"involvedObject.name={name},involvedObject.kind=LLMHyperparameterSearch"
        return list(
            self.cluster.kubectl_json("get", "events", "-n", self.ns, "--field-selector", selector)["items"]
        )


@pytest.fixture
def searches(cluster: Cluster, namespace: str) -> Searches:
    return Searches(cluster, namespace)


def delete_searches(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl(
        "delete",
        "llmhyperparametersearches",
        "--all",
        "-n",
        namespace,
        "--wait=true",
        "--timeout=60s",
        check=False,
    )


@pytest.fixture
def search_operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster, namespace, tmp_path)
    op.start()
    yield op
    # Searches and their trials carry the operator's finalizer: delete them while one runs.
    if op.proc is None or op.proc.poll() is not None:
        op.start()
    delete_searches(cluster, namespace)
    op.shutdown()
    print(f"\n--- operator log (tail) ---\n{op.log()}")


class Outcomes:
    """Scripts each trial's end from its parameters: annotates every new worker pod of the search's
    trials with what ``outcome(parameters)`` returns (kwok then ends the pod that way)."""

    def __init__(self, searches: Searches, name: str, outcome: Any) -> None:
        self.searches, self.name, self.outcome = searches, name, outcome
        self.scripted: set[str] = set()

    def tick(self) -> None:
        cluster, ns = self.searches.cluster, self.searches.ns
        values = {
            j["metadata"]["name"]: json.loads(j["metadata"]["annotations"]["llmop.io/trial-parameters"])
            for j in self.searches.jobs(self.name)
        }
        pods = cluster.kubectl_json("get", "pods", "-n", ns, "-l", "llmop.io/role=worker")["items"]
        for pod in pods:
            job = pod["metadata"]["labels"].get("llmop.io/job-name")
            uid = pod["metadata"]["uid"]
            if job not in values or uid in self.scripted or pod["status"].get("phase") != "Running":
                continue
            pairs = [f"{k}={v}" for k, v in self.outcome(values[job]).items()]
            cluster.kubectl(
                "annotate", "pod", pod["metadata"]["name"], "-n", ns, "--overwrite", *pairs, check=False
            )
            self.scripted.add(uid)

    def until(self, condition: str, timeout: float = 180) -> dict[str, Any]:
        """Keep scripting until the search has ``condition`` True; returns that condition."""

        def check() -> dict[str, Any] | None:
            self.tick()
            c = self.searches.condition(self.name, condition)
            return c if c and c["status"] == "True" else None

        return dict(wait_for(check, timeout=timeout, interval=0.5, what=f"{self.name} {condition}"))
