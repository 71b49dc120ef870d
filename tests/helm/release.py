"""A release of the chart on the local cluster, and the operator run as the release's ServiceAccount.

There is no image registry here, so the chart's operator pod is placed on a kwok node, where kwok
marks it Running with a loopback pod IP but runs nothing. The operator itself runs as a local
process with the pod's settings (the Deployment's environment), listening on the pod's IP, and
authenticated with a token of the chart's ServiceAccount: the apiserver enforces the chart's RBAC
on every call it makes, and Services, probes and monitors that point at the pod reach it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmop_dev import cluster as devcluster
from tests.helm.chart import CHART, THIRD_PARTY_CRDS, Tools
from tests.kube import Cluster, wait_for


def install_monitoring_crds(cluster: Cluster) -> None:
    """prometheus-operator's ServiceMonitor/PodMonitor/PrometheusRule CRDs (vendored, unchanged)."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(THIRD_PARTY_CRDS))
    for path in THIRD_PARTY_CRDS.glob("*.yaml"):
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")


@dataclass
class Release:
    cluster: Cluster
    tools: Tools
    name: str
    namespace: str

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.tools.helm(
            *args, "--namespace", self.namespace, check=check, kubeconfig=self.cluster.kubeconfig
        )

    def install(self, *values: str) -> str:
        # The operator pod goes to a kwok node (no registry: nothing is pulled, nothing runs there).
        return self.helm(
            "install",
            self.name,
            str(CHART),
            "--wait",
            "--timeout",
            "120s",
            "--set",
            "nodeSelector.type=kwok",
            *values,
        ).stdout

    def upgrade(self, *values: str) -> str:
        return self.helm(
            "upgrade", self.name, str(CHART), "--wait", "--timeout", "120s", "--reuse-values", *values
        ).stdout

    def uninstall(self) -> str:
        return self.helm("uninstall", self.name, "--wait", "--timeout", "120s").stdout

    @property
    def fullname(self) -> str:
        return f"{self.name}-llmop"

    @property
    def service_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.fullname}"

    def deployment(self) -> dict[str, Any]:
        return dict(self.cluster.kubectl_json("get", "deployment", self.fullname, "-n", self.namespace))

    def pod(self) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            pods = self.cluster.kubectl_json(
                "get", "pods", "-n", self.namespace, "-l", f"app.kubernetes.io/instance={self.name}"
            )["items"]
            live = [p for p in pods if p["status"].get("phase") == "Running" and p["status"].get("podIP")]
            return live[0] if len(live) == 1 else None

        return dict(wait_for(running, timeout=60, what=f"the one running pod of {self.fullname}"))

    def can_i(self, *args: str, as_user: str | None = None) -> bool:
        out = self.cluster.kubectl(
            "auth", "can-i", *args, f"--as={as_user or self.service_account}", check=False
        )
        assert out.stdout.strip() in ("yes", "no"), out.stderr
        return out.stdout.strip() == "yes"

    def token_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig holding only a token of the release's ServiceAccount."""
        token = self.cluster.kubectl(
            "create", "token", self.fullname, "-n", self.namespace, "--duration", "1h"
        )
        admin = yaml.safe_load(self.cluster.kubeconfig.read_text())
        server = admin["clusters"][0]["cluster"]
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "local", "cluster": server}],
                    "users": [{"name": self.fullname, "user": {"token": token.stdout.strip()}}],
                    "contexts": [{"name": "sa", "context": {"cluster": "local", "user": self.fullname}}],
                    "current-context": "sa",
                }
            )
        )
        return path


class ServiceAccountOperator:
    """`llmop operator` with the release's settings and identity, listening on its pod's IP."""

    def __init__(self, release: Release, workdir: Path, **overrides: str) -> None:
        self.release, self.workdir = release, workdir
        self.overrides = overrides
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "operator.log"

    def start(self) -> None:
        deployment = self.release.deployment()
        pod_spec = deployment["spec"]["template"]["spec"]
        container = pod_spec["containers"][0]
        assert container["command"] == ["llmop", "operator"]
        self.ip = self.release.pod()["status"]["podIP"]
        env = {e["name"]: e.get("value", "") for e in container["env"]}
        # The pod listens on every interface of its own network namespace; this process shares the
        # machine's, so it binds the pod's (loopback) IP instead: same address, same ports.
        env["LLMOP_BIND_ADDRESS"] = self.ip
        env.update(self.overrides)
        self.env = env
        self.ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        self.probe = container["readinessProbe"]["httpGet"]
        kubeconfig = self.release.token_kubeconfig(self.workdir / "sa-kubeconfig.yaml")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmop.cli", *container["command"][1:]],
            env={**os.environ, **env, "KUBECONFIG": str(kubeconfig)},
            stdout=log,
            stderr=log,
        )
        wait_for(self.ready, timeout=60, what="the operator's readiness probe")

    def ready(self) -> bool:
        """The chart's readiness probe, as the kubelet would send it: GET path on the named port."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log()}")
        url = f"http://{self.ip}:{self.ports[self.probe['port']]}{self.probe['path']}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""


def audit_events(user: str, since_offset: int) -> list[dict[str, Any]]:
    """The apiserver's audit events of one user, written after a byte offset of the log."""
    path = devcluster.audit_log_path()
    with path.open("rb") as f:
        f.seek(since_offset)
        lines = f.read().decode(errors="replace").splitlines()
    events = [json.loads(line) for line in lines if line.strip()]
    return [e for e in events if e["user"]["username"] == user]


def audit_offset() -> int:
    path = devcluster.audit_log_path()
    assert path.exists(), f"{path} missing: the cluster runs without the audit policy (dev/cluster.py)"
    return path.stat().st_size


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_state(
    cluster: Cluster, ns: str, name: str, states: tuple[str, ...], timeout: float = 90
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = cluster.kubectl_json("get", "llmtrainingjob", name, "-n", ns)
        return dict(job) if (job.get("status") or {}).get("state") in states else None

    return dict(wait_for(check, timeout=timeout, interval=0.3, what=f"{name} in state {states}"))
