"""An operator process per test, watching only that test's namespace, against the real cluster."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube import Cluster, wait_for
from tests.kueue import Kueue

REPO = Path(__file__).resolve().parents[2]
HOLD = "test.llmop.io/hold"  # a finalizer only tests set, to keep a deleted pod Terminating


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768+).

    A port the kernel hands out for bind(0) is ephemeral: between our probe and the operator's bind,
    any outgoing connection on the machine may take it as its source port (seen under load).
    """
    for _ in range(200):
        port = random.randrange(20000, 32000)
        if port == 29500:  # the default workers.masterPort: a job may not use it as metricsPort too
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


class OperatorProcess:
    def __init__(
        self, cluster: Cluster, namespace: str, log_dir: Path, kubeconfig: Path | None = None
    ) -> None:
        self.cluster, self.namespace = cluster, namespace
        # Another way to the apiserver than the cluster's own (the chaos test's fault proxy).
        self.kubeconfig = kubeconfig or cluster.kubeconfig
        self.metrics_port, self.health_port = free_port(), free_port()
        self.log_path = log_dir / "operator.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "LLMOP_NAMESPACES": self.namespace,
            "LLMOP_BIND_ADDRESS": "127.0.0.1",
            "LLMOP_METRICS_PORT": str(self.metrics_port),
            "LLMOP_HEALTH_PORT": str(self.health_port),
            "LLMOP_PROGRESS_INTERVAL": "1",
            "LLMOP_RESYNC_SECONDS": "5",
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmop.cli", "operator"], env=env, stdout=log, stderr=log
        )
        wait_for(self.healthy, timeout=60, what="operator health endpoint")

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, exactly like an OOM kill or node loss."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def shutdown(self) -> None:
        """Delete the namespace's jobs while an operator still runs, then stop it.

        The jobs' finalizer is Kopf's to remove; without an operator the test namespace would hang
        in Terminating and its jobs would linger in the cluster.
        """
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.cluster.kubectl(
            "delete",
            "llmtrainingjobs",
            "--all",
            "-n",
            self.namespace,
            "--wait=true",
            "--timeout=60s",
            check=False,
        )
        self.stop()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def passes(self) -> float:
        """Reconcile passes of jobs this operator process finished (it watches one namespace)."""
        found = re.search(r"^llmop_reconcile_duration_seconds_count (\S+)$", self.metrics(), re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def wait_passes(self, more: int) -> None:
        """Wait until the operator has reconciled ``more`` times from now: what a test then sees
        is what the operator keeps, not a moment before its next pass."""
        target = self.passes() + more
        wait_for(lambda: self.passes() >= target, timeout=60, what=f"{more} more reconcile passes")

    def log(self) -> str:
        return self.full_log()[-6000:]

    def full_log(self) -> str:
        """Everything every start of this operator wrote (the file is appended to on restart)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster, namespace, tmp_path)
    op.start()
    yield op
    op.shutdown()
    print(f"\n--- operator log (tail) ---\n{op.log()}")


class Jobs:
    """kubectl-level helpers for LLMTrainingJobs in one namespace."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster, self.ns = cluster, namespace

    def create(self, name: str, **spec_overrides: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "data": {"prepare": False},
            "training": {"maxSteps": 100, "globalBatchSize": 8, "microBatchSize": 1},
            # 2 of the 8 GPUs per node, so a straggling pod from an earlier test cannot block this one.
            "workers": {"numNodes": 4, "procsPerNode": 2, "gpusPerNode": 2},
        }
        for key, value in spec_overrides.items():
            spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
        manifest = {
            "apiVersion": "llmop.io/v1alpha1",
            "kind": "LLMTrainingJob",
            "metadata": {"name": name},
            "spec": spec,
        }
        self.cluster.kubectl("apply", "-n", self.ns, "-f", "-", input=yaml.safe_dump(manifest))
        return manifest

    def patch_spec(self, name: str, patch: dict[str, Any]) -> None:
        body = json.dumps({"spec": patch})
        self.cluster.kubectl("patch", "llmtrainingjob", name, "-n", self.ns, "--type=merge", "-p", body)

    def get(self, name: str) -> dict[str, Any]:
        return dict(self.cluster.kubectl_json("get", "llmtrainingjob", name, "-n", self.ns))

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), None)

    def wait_condition(
        self, name: str, type_: str, status: str = "True", timeout: float = 60
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            c = self.condition(name, type_)
            return c if c and c["status"] == status else None

        return dict(wait_for(check, timeout=timeout, what=f"{name} condition {type_}={status}"))

    def pods(self, name: str) -> list[dict[str, Any]]:
        items = self.cluster.kubectl_json(
            "get", "pods", "-n", self.ns, "-l", f"llmop.io/job-name={name},llmop.io/role=worker"
        )["items"]
        return list(items)

    def annotate_pods(self, name: str, annotations: dict[str, str], only: list[str] | None = None) -> None:
        pairs = [f"{k}={v}" for k, v in annotations.items()]
        for pod in only or [p["metadata"]["name"] for p in self.pods(name)]:
            self.cluster.kubectl("annotate", "pod", pod, "-n", self.ns, "--overwrite", *pairs)

    def wait_pods(
        self, name: str, count: int, phase: str = "Running", attempt: int | None = None, timeout: float = 60
    ) -> list[dict[str, Any]]:
        def check() -> list[dict[str, Any]] | None:
            pods = [
                p
                for p in self.pods(name)
                if p["status"].get("phase") == phase
                and not p["metadata"].get("deletionTimestamp")
                and (attempt is None or p["metadata"]["labels"]["llmop.io/attempt"] == str(attempt))
            ]
            return pods if len(pods) == count else None

        return list(
            wait_for(check, timeout=timeout, what=f"{count} {phase} pods of {name} (attempt {attempt})")
        )

    def hold_pods(self, names: list[str]) -> None:
        """Give pods a finalizer of the test's own: deleted, they stay Terminating until released."""
        patch = json.dumps({"metadata": {"finalizers": [HOLD]}})
        for pod in names:
            self.cluster.kubectl("patch", "pod", pod, "-n", self.ns, "--type=merge", "-p", patch)

    def release_pods(self) -> None:
        """Remove the test's finalizer from every pod of the namespace that still has it."""
        items = self.cluster.kubectl_json("get", "pods", "-n", self.ns)["items"]
        for pod in items:
            if HOLD in (pod["metadata"].get("finalizers") or []):
                rest = [f for f in pod["metadata"]["finalizers"] if f != HOLD]
                patch = json.dumps({"metadata": {"finalizers": rest or None}})
                name = pod["metadata"]["name"]
                self.cluster.kubectl(
                    "patch", "pod", name, "-n", self.ns, "--type=merge", "-p", patch, check=False
                )

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.cluster.kubectl_json(
            "get",
            "events",
            "-n",
            self.ns,
            "--field-selector",
            f"involvedObject.name={name},involvedObject.kind=LLMTrainingJob",
        )["items"]
        return list(items)


@pytest.fixture
def jobs(cluster: Cluster, namespace: str) -> Iterator[Jobs]:
    j = Jobs(cluster, namespace)
    yield j
    j.release_pods()  # a held pod would keep its namespace Terminating for good


@pytest.fixture(scope="session")
def kueue(cluster: Cluster) -> Iterator[Kueue]:
    """One real Kueue controller for the session (tests/kueue.py); fails, never skips, when its
    binary is missing: `make bins` builds it with the cluster's binaries."""
    from llmop_dev import cluster as devcluster

    bin_dir = devcluster.cache_dir() / "bin"
    binary, manifests = bin_dir / "kueue", bin_dir / "kueue-manifests"
    if not (binary.exists() and (manifests / "webhooks.yaml").exists()):
        pytest.fail(f"{binary} or {manifests} is missing: run `make bins` (hack/build-cluster-bins.sh)")
    k = Kueue(cluster, binary, manifests).start()
    yield k
    print(f"\n--- kueue errors (log {k.log_path}) ---\n{k.errors()}")
    k.stop()
