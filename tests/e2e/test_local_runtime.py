"""`make demo` as tests: LLMTrainingJobs from apply to a trained model on the development runtime.

Real operator, real pods run as local processes by `llmop dev runtime`, real DeepSpeed over gloo
between two pods. Tiny models and ~100 steps keep the file to a few minutes on two cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.cluster.conftest import Jobs, OperatorProcess
from tests.e2e.conftest import claim_dir, is_alive, pod_processes, tiny_job, trainer_log
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster
FINISH_TIMEOUT = 420


def apply(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))


def wait_state(
    jobs: Jobs, name: str, states: tuple[str, ...], timeout: float = FINISH_TIMEOUT
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        status = jobs.status(name)
        if status.get("state") == "Failed" and "Failed" not in states:
            raise AssertionError(f"{name} failed: {status.get('conditions')}")
        return status if status.get("state") in states else None

    return dict(wait_for(check, timeout=timeout, interval=1, what=f"{name} in {states}"))


def validation_loss(model: Any, data_dir: Path, context: int = 64, batches: int = 16) -> float:
    import torch

    manifest = json.loads((data_dir / "manifest.json").read_text())
    tokens = np.concatenate(
        [np.fromfile(data_dir / s["file"], dtype=manifest["dtype"]) for s in manifest["splits"]["val"]]
    ).astype(np.int64)
    windows = torch.from_numpy(tokens[: batches * (context + 1)].reshape(batches, context + 1))
    model.eval()
    with torch.no_grad():
        # transformers shifts the labels itself: labels == input_ids is next-token prediction.
        return float(model(input_ids=windows[:, :-1], labels=windows[:, :-1]).loss)


def test_quickstart_flow_trains_a_model_that_loads(
    cluster: Cluster, namespace: str, jobs: Jobs, local_operator: OperatorProcess
) -> None:
    apply(cluster, namespace, tiny_job("flow", max_steps=150))
    steps: set[int] = set()

    def finished() -> dict[str, Any] | None:
        status = jobs.status("flow")
        steps.add(int((status.get("progress") or {}).get("step", 0)))
        if status.get("state") == "Failed":
            raise AssertionError(f"flow failed: {status.get('conditions')}")
        return status if status.get("state") == "Succeeded" else None

    status = wait_for(finished, timeout=FINISH_TIMEOUT, interval=1, what="flow Succeeded")
    assert [s["name"] for s in status["stages"]] == ["prepare", "train"]
    assert all(s["state"] == "Succeeded" for s in status["stages"])
    moving = sorted(s for s in steps if 0 < s < 150)
    assert len(moving) >= 2, f"progress never seen moving: {sorted(steps)}"
    assert status["restartCount"] == 0

    # Both pods trained: rank 0 reports a world of 2, and the pods had distinct loopback IPs.
    log0 = trainer_log(namespace, "flow-worker-0")
    assert "world_size=2" in log0
    ips = {p["status"]["podIP"] for p in jobs.pods("flow")}
    assert len(ips) == 2 and all(ip.startswith("127.2.") for ip in ips)

    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    storage = claim_dir(cluster, namespace, "flow-storage")
    trained: Any = AutoModelForCausalLM.from_pretrained(storage / "output" / "model")
    untrained: Any = LlamaForCausalLM(LlamaConfig.from_pretrained(storage / "output" / "model"))
    trained_loss = validation_loss(trained, storage / "data")
    untrained_loss = validation_loss(untrained, storage / "data")
    print(f"validation loss: untrained {untrained_loss:.3f}, trained {trained_loss:.3f}")
    assert trained_loss < untrained_loss - 1.5, (trained_loss, untrained_loss)
    assert untrained_loss > math.log(2048) - 1


def rank_process(namespace: str, pod: str) -> int | None:
    """PID of the training process (a torchrun worker, not the launcher or the agent) of a pod."""
    for pid, env in pod_processes(namespace):
        if env["LLMOP_RUNTIME_POD"] == f"{namespace}/{pod}" and "LOCAL_RANK" in env:
            return pid
    return None


def test_kill_9_of_a_rank_restarts_the_gang_which_resumes(
    cluster: Cluster, namespace: str, jobs: Jobs, local_operator: OperatorProcess
) -> None:
    apply(cluster, namespace, tiny_job("fault", max_steps=150, checkpoint_every=20))
    wait_for(
        lambda: re.search(r"checkpoint rank=0 step=(\d+)", trainer_log(namespace, "fault-worker-0")),
        timeout=FINISH_TIMEOUT,
        interval=0.5,
        what="a first checkpoint",
    )
    pid = wait_for(lambda: rank_process(namespace, "fault-worker-1"), what="worker 1's rank process")
    os.kill(pid, signal.SIGKILL)
    status = wait_state(jobs, "fault", ("Succeeded",))
    assert status["restartCount"] == 1

    # The second attempt's rank 0 resumed from a checkpoint, not from step 0.
    log0 = trainer_log(namespace, "fault-worker-0")
    starts = re.findall(r" start rank=0 .*resumed_from=(\S+)", log0)
    assert len(starts) == 2 and starts[0] == "None", starts
    resumed = re.fullmatch(r"step-(\d+)", starts[1])
    assert resumed and int(resumed.group(1)) > 0, starts
    print(f"attempt 1 resumed from {starts[1]}")
    assert wait_for(lambda: jobs.status("fault")["progress"]["step"] == 150, timeout=30)


def test_deleting_a_running_job_ends_every_process_and_child(
    cluster: Cluster, namespace: str, jobs: Jobs, local_operator: OperatorProcess
) -> None:
    apply(cluster, namespace, tiny_job("gone", max_steps=5000))
    wait_for(
        lambda: "progress rank=0" in trainer_log(namespace, "gone-worker-0"), timeout=300, what="training"
    )
    pids = [pid for pid, _ in pod_processes(namespace)]
    assert len(pids) >= 6  # per pod: unshare, launcher, torchrun agent, rank

    started = time.monotonic()
    cluster.kubectl("delete", "llmtrainingjob", "gone", "-n", namespace, "--timeout=180s")
    leftovers = ("pods", "jobs.batch", "configmaps", "services", "persistentvolumeclaims", "serviceaccounts")

    def children() -> list[str]:
        out = cluster.kubectl("get", ",".join(leftovers), "-n", namespace, "-o", "name").stdout.split()
        # The namespace's own objects are not the job's.
        return [o for o in out if not o.endswith(("/kube-root-ca.crt", "/default"))]

    wait_for(lambda: not children(), timeout=120, what="every child object gone")
    wait_for(lambda: not pod_processes(namespace), timeout=60, what="every pod process gone")
    assert not [pid for pid in pids if is_alive(pid)]
    print(f"job deleted, its processes and children gone in {time.monotonic() - started:.1f}s")


def test_two_jobs_at_once_both_succeed(
    cluster: Cluster, namespace: str, jobs: Jobs, local_operator: OperatorProcess
) -> None:
    # Same masterPort and metricsPort, same nodes: only the pod IPs keep them apart.
    for name in ("twin-a", "twin-b"):
        apply(cluster, namespace, tiny_job(name, max_steps=60, checkpoint_every=30))
    for name in ("twin-a", "twin-b"):
        status = wait_state(jobs, name, ("Succeeded",))
        assert status["restartCount"] == 0
        assert (
            claim_dir(cluster, namespace, f"{name}-storage") / "output" / "model" / "model.safetensors"
        ).exists()
    nodes = {
        (p["spec"]["nodeName"], p["metadata"]["name"])
        for name in ("twin-a", "twin-b")
        for p in jobs.pods(name)
    }
    assert {n for n, _ in nodes} == {"local-0", "local-1"}
