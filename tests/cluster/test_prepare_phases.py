"""data.distributed on the real apiserver and Job controller: one Indexed Job per phase, in order; a
failed pod is retried alone while the other indexes keep what they finished; status and the
operator's metrics say each phase's pods and documents."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cluster.conftest import Jobs, OperatorProcess
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster
EXIT_AFTER = "llmop.io/kwok-exit-after"
EXIT_CODE = "llmop.io/kwok-exit-code"
PHASE = "llmop.io/prepare-phase"
INDEX = "batch.kubernetes.io/job-completion-index"
REPORT = {"results": {"documentsRead": 250, "documentsKept": 240}, "stage": "prepare"}


def phase_pods(cluster: Cluster, ns: str, job: str, phase: str) -> list[dict[str, Any]]:
    selector = f"llmop.io/job-name={job},llmop.io/role=prepare,{PHASE}={phase}"
    return list(cluster.kubectl_json("get", "pods", "-n", ns, "-l", selector)["items"])


def phase_jobs(cluster: Cluster, ns: str, job: str) -> dict[str, dict[str, Any]]:
    items = cluster.kubectl_json("get", "jobs.batch", "-n", ns, "-l", f"llmop.io/job-name={job}")["items"]
    return {j["metadata"]["labels"][PHASE]: j for j in items if PHASE in j["metadata"]["labels"]}


def annotate(cluster: Cluster, ns: str, pods: list[dict[str, Any]], annotations: dict[str, str]) -> None:
    pairs = [f"{k}={v}" for k, v in annotations.items()]
    for pod in pods:
        cluster.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", ns, "--overwrite", *pairs)


def test_phases_run_in_order_as_indexed_jobs_and_a_failed_pod_is_retried_alone(
    jobs: Jobs, operator: OperatorProcess, cluster: Cluster
) -> None:
    ns = jobs.ns
    jobs.create(
        "dist",
        data={"prepare": True, "sources": [{"uri": "builtin://english"}], "distributed": {"pods": 3}},
        workers={"podAnnotations": {"llmop.io/kwok-termination-message": json.dumps(REPORT)}},
    )
    scan = wait_for(
        lambda: (pods := phase_pods(cluster, ns, "dist", "scan")) and len(pods) == 3 and pods,
        timeout=60,
        what="the scan phase's 3 pods",
    )
    assert sorted(p["metadata"]["labels"][INDEX] for p in scan) == ["0", "1", "2"]
    assert set(phase_jobs(cluster, ns, "dist")) == {"scan"}, "no later phase before scan succeeded"
    env = {e["name"] for e in scan[0]["spec"]["containers"][0].get("env", [])}
    assert "JOB_COMPLETION_INDEX" in env, "the Job controller tells each pod its index"
    assert scan[0]["spec"]["containers"][0]["args"][-2:] == ["--phase", "scan"]

    # Index 1 fails: only it is retried; 0 and 2 finish and are not run again.
    wait_for(
        lambda: all(p["status"].get("phase") == "Running" for p in phase_pods(cluster, ns, "dist", "scan")),
        timeout=60,
        what="scan pods running",
    )
    first = {p["metadata"]["labels"][INDEX]: p["metadata"]["uid"] for p in scan}
    by_index = {p["metadata"]["labels"][INDEX]: p for p in scan}
    annotate(cluster, ns, [by_index["1"]], {EXIT_AFTER: "1s", EXIT_CODE: "1"})
    annotate(cluster, ns, [by_index["0"], by_index["2"]], {EXIT_AFTER: "1s"})

    def retried() -> list[dict[str, Any]] | None:
        pods = phase_pods(cluster, ns, "dist", "scan")
        fresh = [p for p in pods if p["metadata"]["uid"] not in first.values()]
        return fresh or None

    fresh = wait_for(retried, timeout=60, what="a retry of the failed scan index")
    assert [p["metadata"]["labels"][INDEX] for p in fresh] == ["1"], "only the failed index reruns"
    wait_for(
        lambda: jobs.status("dist").get("preparation", {}).get("phases", [{}])[0].get("retries") == 1,
        timeout=30,
        what="the retry in status",
    )
    annotate(cluster, ns, fresh, {EXIT_AFTER: "1s"})

    # Every later phase follows once the one before it is Complete; each pod gets the same annotations.
    for phase in ("dedup", "cluster", "write", "commit"):
        count = 3 if phase in ("dedup", "write") else 1
        pods = wait_for(
            lambda phase=phase, count=count: (
                (p := phase_pods(cluster, ns, "dist", phase)) and len(p) == count and p
            ),
            timeout=60,
            what=f"the {phase} phase's pods",
        )
        wait_for(
            lambda phase=phase: all(
                p["status"].get("phase") == "Running" for p in phase_pods(cluster, ns, "dist", phase)
            ),
            timeout=60,
            what=f"{phase} pods running",
        )
        annotate(cluster, ns, pods, {EXIT_AFTER: "1s"})
    jobs.wait_condition("dist", "DataPrepared", timeout=60)
    status = jobs.status("dist")
    phases = status["preparation"]["phases"]
    assert [(p["name"], p["state"], p["pods"]) for p in phases] == [
        ("scan", "Succeeded", 3),
        ("dedup", "Succeeded", 3),
        ("cluster", "Succeeded", 1),
        ("write", "Succeeded", 3),
        ("commit", "Succeeded", 1),
    ]
    assert phases[0]["completedIndexes"] == "0-2" and phases[0]["retries"] == 1
    assert (phases[0]["documentsRead"], phases[0]["documentsKept"]) == (750, 720)
    assert set(phase_jobs(cluster, ns, "dist")) == {p["name"] for p in phases}
    jobs.wait_pods("dist", 4)  # training starts once the data is prepared
    text = operator.metrics()
    assert (
        f'llmop_prepare_phase_pods{{job="dist",namespace="{ns}",phase="scan",state="Succeeded"}} 3.0' in text
    )
