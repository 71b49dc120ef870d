"""End to end on the development runtime: real operator, real pods as processes, real training.

One runtime for the session (it serves local-0 and local-1 of the session's cluster); one operator
per test, watching only that test's namespace. Every process started here is stopped here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmop_dev import cluster as devcluster
from llmop_dev.runtime import paths
from llmop_dev.stack import Background, start_runtime
from tests.cluster.conftest import Jobs, OperatorProcess
from tests.kube import Cluster


@pytest.fixture
def jobs(cluster: Cluster, namespace: str) -> Jobs:
    return Jobs(cluster, namespace)


@pytest.fixture(scope="session")
def runtime(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    log = tmp_path_factory.mktemp("runtime") / "runtime.log"
    rt = start_runtime(cluster.kubeconfig, log)
    yield rt
    rt.stop()
    print(f"\n--- runtime log (tail) ---\n{log.read_text(errors='replace')[-4000:]}")


@pytest.fixture
def local_operator(
    cluster: Cluster, runtime: Background, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster, namespace, tmp_path)
    op.start()
    yield op
    op.shutdown()
    print(f"\n--- operator log (tail) ---\n{op.log()}")


def tiny_job(
    name: str, max_steps: int = 100, checkpoint_every: int = 20, after_training: bool = False
) -> dict[str, Any]:
    """A job small enough for CI: 200k parameters, 2 pods x 1 process on the local nodes.

    Training only, unless after_training keeps the quickstart's compression and serving sections.
    """
    quickstart = yaml.safe_load((devcluster.REPO / "examples" / "quickstart.yaml").read_text())
    spec = quickstart["spec"]
    if not after_training:
        spec.pop("compression", None)
        spec.pop("serving", None)
    spec["model"] = {
        "hiddenSize": 64,
        "numLayers": 2,
        "numHeads": 2,
        "intermediateSize": 172,
        "vocabSize": 2048,
        "contextLength": 64,
    }
    spec["training"].update(
        maxSteps=max_steps,
        sequenceLength=64,
        microBatchSize=16,
        globalBatchSize=32,
        checkpointing={"intervalSteps": checkpoint_every, "keepLast": 2},
        evaluation={"intervalSteps": 50, "maxBatches": 4},
        logIntervalSteps=10,
    )
    spec["training"]["lrSchedule"] = {"warmupSteps": 10}
    spec["training"]["optimizer"]["learningRate"] = 0.006
    return {
        "apiVersion": "llmop.io/v1alpha1",
        "kind": "LLMTrainingJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def pod_processes(namespace: str) -> list[tuple[int, dict[str, str]]]:
    """Every process the runtime started for pods of this namespace: (pid, environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            raw = (proc / "environ").read_bytes()
        except OSError:
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        # The runtime marks every process of a pod with LLMOP_RUNTIME_POD=<namespace>/<pod>.
        if env.get("LLMOP_RUNTIME_POD", "").startswith(f"{namespace}/"):
            found.append((int(proc.name), env))
    return found


def trainer_log(namespace: str, pod: str) -> str:
    path = paths.log_path(namespace, pod, "trainer")
    return path.read_text(errors="replace") if path.exists() else ""


def claim_dir(cluster: Cluster, namespace: str, claim: str) -> Path:
    pvc = cluster.kubectl_json("get", "pvc", claim, "-n", namespace)
    pv = cluster.kubectl_json("get", "pv", pvc["spec"]["volumeName"])
    host_path = (pv["spec"].get("hostPath") or {}).get("path")
    return Path(host_path) if host_path else paths.claim_dir(namespace, claim)


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
