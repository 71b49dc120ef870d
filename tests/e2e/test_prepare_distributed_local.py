"""data.distributed on the development runtime: the prepare phases as Indexed Jobs whose pods run
the real trainer as local processes, on a shared volume.

Two jobs prepare the same planted-duplicate corpus, one with 1 pod per phase and one with 4: the kept
documents, the duplicate clusters and each split's token stream must be the same (the shards'
boundaries follow the pods, so they may differ), and the training that follows reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmop import naming
from tests.cluster.conftest import Jobs, OperatorProcess
from tests.e2e.conftest import claim_dir, tiny_job
from tests.e2e.test_local_runtime import apply, wait_state
from tests.kube import Cluster

pytestmark = pytest.mark.cluster


def job(name: str, pods: int) -> dict[str, Any]:
    manifest = tiny_job(name, max_steps=10, checkpoint_every=10)
    data = manifest["spec"]["data"]
    data["sources"] = [{"uri": "builtin://english-dups"}]
    # Each phase's pods are small: 4 of them share the runtime's two nodes.
    data["distributed"] = {"pods": pods, "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}}}
    return manifest


def prepared(cluster: Cluster, namespace: str, name: str) -> tuple[dict[str, Any], Path]:
    data = claim_dir(cluster, namespace, naming.claim_name(name)) / "data"
    return json.loads((data / "manifest.json").read_text()), data


def stream(manifest: dict[str, Any], data: Path, split: str) -> np.ndarray[Any, Any]:
    shards = manifest["splits"][split]
    return np.concatenate([np.fromfile(data / s["file"], dtype=manifest["dtype"]) for s in shards])


def clusters(data: Path) -> list[dict[str, Any]]:
    lines = (data / "dedup_clusters.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda c: (c["kind"], c["kept"]))


def test_one_pod_and_four_pods_prepare_the_same_data(
    cluster: Cluster, namespace: str, jobs: Jobs, local_operator: OperatorProcess
) -> None:
    apply(cluster, namespace, job("one", 1))
    apply(cluster, namespace, job("four", 4))
    four = wait_state(jobs, "four", ("Running", "Succeeded"), timeout=600)
    one = wait_state(jobs, "one", ("Running", "Succeeded"), timeout=600)

    phases = four["preparation"]["phases"]
    assert [(p["name"], p["pods"], p["state"]) for p in phases] == [
        ("scan", 4, "Succeeded"),
        ("dedup", 4, "Succeeded"),
        ("cluster", 1, "Succeeded"),
        ("write", 4, "Succeeded"),
        ("commit", 1, "Succeeded"),
    ]
    assert phases[0]["completedIndexes"] == "0-3"
    read = [p["documentsRead"] for p in phases if p["name"] == "scan"]
    assert read == [p["documentsRead"] for p in one["preparation"]["phases"] if p["name"] == "scan"]

    (m1, d1), (m4, d4) = prepared(cluster, namespace, "one"), prepared(cluster, namespace, "four")
    assert clusters(d1) == clusters(d4), "the same duplicates found and the same documents kept"
    assert len([c for c in clusters(d4) if c["kind"] == "near"]) > 0
    for split in ("train", "val"):
        a, b = stream(m1, d1, split), stream(m4, d4, split)
        print(f"{split}: {len(a)} tokens in {len(m1['splits'][split])} vs {len(m4['splits'][split])} shards")
        assert np.array_equal(a, b), f"the {split} token streams differ"

    # Training reads what the phases committed.
    for name in ("one", "four"):
        status = wait_state(jobs, name, ("Succeeded",), timeout=600)
        assert status["progress"]["step"] == 10
