"""The runtime's nodes: registered on start, kept Ready by heartbeats like a kubelet's.

Liveness is a Lease per node in kube-node-lease (renewed every few seconds; the node lifecycle
controller reads it) plus the Ready condition in node status (refreshed less often). The nodes carry
no ``kwok.x-k8s.io/node`` annotation, so kwok leaves them and their pods alone, and a
``llmop.io/local-runtime`` NoSchedule taint, so only pods that ask for local execution land there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime

from llmop_dev.runtime.api import Api, Obj

LOCAL_LABEL = "llmop.io/local-runtime"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def host_memory() -> str:
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return f"{pages * size // 1024}Ki"


@dataclass(frozen=True)
class LocalNode:
    name: str
    ip: str

    def manifest(self) -> Obj:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "local",
                    LOCAL_LABEL: "true",
                },
            },
            "spec": {"taints": [{"key": LOCAL_LABEL, "value": "true", "effect": "NoSchedule"}]},
        }

    def status(self, ready: bool, message: str) -> Obj:
        # This machine's real CPU and memory: the scheduler may then place a few pods per node, while
        # nothing is reserved (the runtime enforces no requests or limits).
        capacity = {
            "cpu": str(os.cpu_count() or 1),
            "memory": host_memory(),
            "pods": "110",
            "nvidia.com/gpu": "0",
        }
        stamp = now()
        return {
            "addresses": [
                {"type": "InternalIP", "address": self.ip},
                {"type": "Hostname", "address": self.name},
            ],
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if ready else "False",
                    "reason": "KubeletReady" if ready else "KubeletNotReady",
                    "message": message,
                    "lastHeartbeatTime": stamp,
                    "lastTransitionTime": stamp,
                }
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "containerRuntimeVersion": "llmop-dev-runtime://0.1",
                "kubeletVersion": "llmop-dev-runtime",
                "kubeProxyVersion": "",
                "kernelVersion": os.uname().release,
                "osImage": "local processes",
                "bootID": "",
                "machineID": "",
                "systemUUID": "",
            },
        }


def default_nodes(count: int = 2, first: int = 0) -> list[LocalNode]:
    """local-<first> .. local-<first + count - 1>: a node's name and IP depend on its index only, so
    runtimes started with different first indexes serve disjoint nodes (one runtime per node, each
    stoppable on its own)."""
    # 127.0.2.x: next to the kwok nodes' 127.0.1.x, still loopback.
    return [LocalNode(name=f"local-{i}", ip=f"127.0.2.{1 + i}") for i in range(first, first + count)]


class Heartbeat:
    def __init__(self, api: Api, nodes: list[LocalNode], identity: str) -> None:
        self.api, self.nodes, self.identity = api, nodes, identity

    def foreign_holder(self) -> str | None:
        """Another live runtime holding one of our nodes' leases: two kubelets must not share a node."""
        for node in self.nodes:
            lease = self.api.get_optional("lease", node.name, LEASE_NAMESPACE)
            spec = (lease or {}).get("spec") or {}
            holder, renewed = spec.get("holderIdentity"), spec.get("renewTime")
            if not holder or holder == self.identity or not renewed:
                continue
            age = datetime.now(UTC) - datetime.fromisoformat(renewed.replace("Z", "+00:00"))
            if age.total_seconds() < 15:
                return str(holder)
        return None

    def register(self) -> None:
        for node in self.nodes:
            self.api.create_node(node.manifest())
            # Labels/taints may have been changed by hand or by an older runtime: put ours back.
            self.api.patch_node(node.name, node.manifest())
        self.status(ready=True)

    def renew_leases(self) -> None:
        for node in self.nodes:
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": node.name, "namespace": LEASE_NAMESPACE},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": LEASE_SECONDS,
                    "renewTime": now_micro(),
                },
            }
            self.api.put_lease(LEASE_NAMESPACE, lease)

    def release_leases(self) -> None:
        """On a clean stop: the next runtime may take the nodes at once."""
        for node in self.nodes:
            self.api.put_lease(
                LEASE_NAMESPACE, {"metadata": {"name": node.name}, "spec": {"holderIdentity": None}}
            )

    def status(self, ready: bool, message: str = "llmop development runtime is running") -> None:
        for node in self.nodes:
            self.api.patch_node_status(node.name, node.status(ready, message))
