"""A real local Kubernetes control plane for development and tests.

kwokctl runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok-controller as
local processes (``--runtime binary``) from binaries this project builds (``hack/build-cluster-bins.sh``).
Fake GPU nodes are Node objects that kwok keeps Ready; pods on them follow the Stages in
``kwok/stages.yaml``. Everything listens on and advertises 127.0.0.0/8 addresses only.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
KWOK_DIR = Path(__file__).parent / "kwok"
CLUSTER_NAME = os.environ.get("LLMOP_CLUSTER_NAME", "llmop")
# Pod IPs kwok hands out; kept inside loopback so anything dialling a pod stays on this machine.
POD_CIDR = "127.1.0.0/16"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"


def log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("LLMOP_CACHE_DIR", Path.home() / ".cache" / "llmop"))


def ensure_binaries() -> Path:
    """Build (or reuse) the pinned binaries; returns the directory that holds them."""
    script = REPO / "hack" / "build-cluster-bins.sh"
    out = subprocess.run([str(script)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def kwok_home() -> Path:
    return Path(os.environ.get("KWOK_WORKDIR", Path.home() / ".kwok"))


def kubeconfig_path(name: str = CLUSTER_NAME) -> Path:
    return kwok_home() / "clusters" / name / "kubeconfig.yaml"


def audit_log_path(name: str = CLUSTER_NAME) -> Path:
    """The kube-apiserver's audit log (ServiceAccount requests only, kwok/audit-policy.yaml)."""
    return kwok_home() / "clusters" / name / "logs" / "audit.log"


def tool_env(bin_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # kwokctl shells out to kubectl; it must find ours (v1.36), not an older one on the system.
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


@dataclass
class FakeNode:
    """A fake GPU node; kwok keeps it Ready and plays its pods."""

    name: str
    ip: str
    gpus: int = 8
    cpu: str = "96"
    memory: str = "1024Gi"
    labels: dict[str, str] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.product": GPU_PRODUCT,
                    "nvidia.com/gpu.count": str(self.gpus),
                    "nvidia.com/gpu.memory": "81559",
                    **self.labels,
                },
            },
            "spec": {},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": self.ip},
                    {"type": "Hostname", "address": self.name},
                ],
                "allocatable": {
                    "cpu": self.cpu,
                    "memory": self.memory,
                    "pods": "110",
                    "nvidia.com/gpu": str(self.gpus),
                },
                "capacity": {
                    "cpu": self.cpu,
                    "memory": self.memory,
                    "pods": "110",
                    "nvidia.com/gpu": str(self.gpus),
                },
            },
        }


def default_nodes(count: int = 4, gpus: int = 8) -> list[FakeNode]:
    # Node i gets 127.0.1.(i+1): the apiserver dials node IPs for logs/exec, so they stay on loopback.
    return [
        FakeNode(name=f"gpu-node-{i}", ip=f"127.0.{1 + i // 250}.{1 + i % 250}", gpus=gpus)
        for i in range(count)
    ]


def render_config(bin_dir: Path) -> str:
    """kwokctl configuration: binaries, loopback binding, RBAC, pod CIDR and our Stages."""
    kwokctl = {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokctlConfiguration",
        "options": {
            "runtime": "binary",
            "bindAddress": "127.0.0.1",
            "kubeAuthorization": True,
            "kubeAdmission": True,
            "kubeApiserverBinary": str(bin_dir / "kube-apiserver"),
            "kubeControllerManagerBinary": str(bin_dir / "kube-controller-manager"),
            "kubeSchedulerBinary": str(bin_dir / "kube-scheduler"),
            "kwokControllerBinary": str(bin_dir / "kwok"),
            "etcdBinary": str(bin_dir / "etcd"),
            "kubectlBinary": str(bin_dir / "kubectl"),
            # ServiceAccount requests land in logs/audit.log (audit_log_path()); see the policy file.
            "kubeAuditPolicy": str(KWOK_DIR / "audit-policy.yaml"),
        },
        "componentsPatches": [
            {"name": "kube-apiserver", "extraArgs": [{"key": "advertise-address", "value": "127.0.0.1"}]},
            # The development-only hostPath provisioner binds the PersistentVolumeClaims jobs create.
            {
                "name": "kube-controller-manager",
                "extraArgs": [{"key": "enable-hostpath-provisioner", "value": "true"}],
            },
            # Flags rather than a KwokConfiguration document: a partial one drops kwok's defaults.
            # kwok plays only the fake nodes (annotated kwok.x-k8s.io/node=fake), so the nodes of the
            # development runtime (`llmop dev runtime`) and their pods are left to that runtime.
            {
                "name": "kwok-controller",
                "extraArgs": [
                    {"key": "cidr", "value": POD_CIDR},
                    {"key": "node-ip", "value": "127.0.0.1"},
                    {"key": "manage-all-nodes", "value": "false"},
                    {"key": "manage-nodes-with-annotation-selector", "value": "kwok.x-k8s.io/node=fake"},
                ],
            },
        ],
    }
    stages = (KWOK_DIR / "stages.yaml").read_text()
    stages = stages.replace('"@terminated.tmpl"', json.dumps((KWOK_DIR / "terminated.tmpl").read_text()))
    return "\n---\n".join([yaml.safe_dump(kwokctl), stages])


def kubectl(bin_dir: Path, kubeconfig: Path, *args: str, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        [str(bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
        env=tool_env(bin_dir),
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def healthy(bin_dir: Path, kubeconfig: Path) -> bool:
    if not kubeconfig.exists():
        return False
    proc = subprocess.run(
        [
            str(bin_dir / "kubectl"),
            "--kubeconfig",
            str(kubeconfig),
            "get",
            "--raw",
            "/readyz",
            "--request-timeout=5s",
        ],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


class ClusterInUse(RuntimeError):
    """A healthy cluster of this name was made by another checkout on this machine."""


def read_stamp(stamp: Path) -> dict[str, str]:
    """What made the cluster: its configuration digest and checkout; empty if unknown."""
    try:
        made = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return {}
    return made if isinstance(made, dict) else {}


def up(node_count: int = 4) -> Path:
    """Start the cluster or reuse a healthy one; install CRDs and fake nodes. Returns the kubeconfig."""
    bin_dir = ensure_binaries()
    kubeconfig = kubeconfig_path()
    env = tool_env(bin_dir)
    kwokctl = [str(bin_dir / "kwokctl"), "--name", CLUSTER_NAME]
    rendered = render_config(bin_dir)
    # A running cluster is reused only if it was made from the same configuration and binaries.
    stamp = kwok_home() / "clusters" / CLUSTER_NAME / "llmop-config.json"
    digest = hashlib.sha256(rendered.encode()).hexdigest()
    made = read_stamp(stamp)
    is_healthy = healthy(bin_dir, kubeconfig)
    if is_healthy and made.get("checkout") not in (None, str(REPO)):
        # The configuration embeds this checkout's paths, so another checkout's cluster always looks
        # "different"; recreating it would pull the apiserver out from under that checkout's tests.
        raise ClusterInUse(
            f"cluster {CLUSTER_NAME} is running for another checkout ({made['checkout']}); "
            f"set LLMOP_CLUSTER_NAME to another name for this one, or run `make cluster-down` there"
        )
    if is_healthy and made.get("digest") == digest:
        log(f"reusing running cluster {CLUSTER_NAME}")
    else:
        if (kwok_home() / "clusters" / CLUSTER_NAME).exists():
            # A cluster left behind by a crash or reboot: restart it if it can be, else recreate it.
            log(f"cluster {CLUSTER_NAME} is unhealthy or was made from another configuration; recreating it")
            subprocess.run([*kwokctl, "delete", "cluster"], env=env, capture_output=True)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(rendered)
        log(f"creating cluster {CLUSTER_NAME} (kube-apiserver from {bin_dir})")
        proc = subprocess.run(
            [*kwokctl, "create", "cluster", "--runtime", "binary", "--config", f.name, "--wait", "3m"],
            env=env,
            capture_output=True,
            text=True,
        )
        os.unlink(f.name)
        if proc.returncode != 0:
            raise RuntimeError(f"kwokctl create cluster failed:\n{proc.stdout}\n{proc.stderr}")
        wait_ready(bin_dir, kubeconfig)
        stamp.write_text(json.dumps({"digest": digest, "checkout": str(REPO)}))
    install(bin_dir, kubeconfig, default_nodes(node_count))
    return kubeconfig


def wait_ready(bin_dir: Path, kubeconfig: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(bin_dir, kubeconfig):
            # The default ServiceAccount appears only once the controller-manager runs; tests need it.
            if kubectl(bin_dir, kubeconfig, "get", "serviceaccount", "default", "-o", "name", check=False):
                return
        time.sleep(1)
    raise TimeoutError("the local cluster did not become ready")


STORAGE_CLASS = {
    "apiVersion": "storage.k8s.io/v1",
    "kind": "StorageClass",
    "metadata": {"name": "standard", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
    "provisioner": "kubernetes.io/host-path",
    "reclaimPolicy": "Delete",
    "volumeBindingMode": "Immediate",
}


def install(bin_dir: Path, kubeconfig: Path, nodes: list[FakeNode]) -> None:
    """Apply the CRDs, a default StorageClass and the nodes (idempotent)."""
    kubectl(bin_dir, kubeconfig, "apply", "--server-side", "-f", "-", input=json.dumps(STORAGE_CLASS))
    kubectl(bin_dir, kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    for crd in (REPO / "crds").glob("*.yaml"):
        name = yaml.safe_load(crd.read_text())["metadata"]["name"]
        kubectl(bin_dir, kubeconfig, "wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    existing = set(kubectl(bin_dir, kubeconfig, "get", "nodes", "-o", "name").split())
    missing = [n for n in nodes if f"node/{n.name}" not in existing]
    if missing:
        docs = {"apiVersion": "v1", "kind": "List", "items": [n.manifest() for n in missing]}
        kubectl(bin_dir, kubeconfig, "create", "-f", "-", input=json.dumps(docs))
    log(f"{len(nodes)} fake GPU nodes registered")


def down() -> None:
    bin_dir = ensure_binaries()
    subprocess.run(
        [str(bin_dir / "kwokctl"), "--name", CLUSTER_NAME, "delete", "cluster"],
        env=tool_env(bin_dir),
        check=False,
    )


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "up"
    if cmd == "up":
        print(up())
    elif cmd == "down":
        down()
    elif cmd == "bins":
        print(ensure_binaries())
    else:
        print(f"usage: {argv[0]} up|down|bins", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
