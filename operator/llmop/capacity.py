"""All-or-nothing placement check for gangs that have no gang scheduler.

Without Volcano, coscheduling or Kueue, the default scheduler would bind whichever workers fit and
leave the rest Pending: a half-placed gang that holds GPUs and never trains. So the operator creates
workers behind a scheduling gate and lifts the gate only when every worker fits on a distinct
feasible node (GPU, CPU and memory requests, node selector, taints). Pods already ungated but not yet
bound count as using capacity, so two gangs released together cannot both claim the same GPUs.
(Released-but-unbound pods are assumed to land on the most-free nodes, whatever their selectors.)
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

_SUFFIX = {
    "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}  # fmt: skip
_QUANTITY = re.compile(r"^([0-9.]+(?:e[0-9]+)?)([a-zA-Z]*)$")
TRACKED = ("nvidia.com/gpu", "cpu", "memory")


def quantity(value: Any) -> float:
    """Parse a Kubernetes quantity ("500m", "64Gi", 8) into a float."""
    m = _QUANTITY.match(str(value).strip())
    if not m:
        raise ValueError(f"not a quantity: {value!r}")
    return float(m.group(1)) * _SUFFIX.get(m.group(2), 1.0)


def requests_of_resources(resources: Mapping[str, Any]) -> dict[str, float]:
    """One container's tracked requests (a limit stands in for a missing request, as in Kubernetes)."""
    merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
    return {name: quantity(merged[name]) if name in merged else 0.0 for name in TRACKED}


def requests_of(pod_spec: Mapping[str, Any]) -> dict[str, float]:
    total = dict.fromkeys(TRACKED, 0.0)
    for c in pod_spec.get("containers", []):
        for name, value in requests_of_resources(c.get("resources") or {}).items():
            total[name] += value
    return total


@dataclass(frozen=True)
class Demand:
    """What one member of a gang asks of its node: requests and the placement constraints checked."""

    requests: Mapping[str, float]
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def of_pod(cls, pod_spec: Mapping[str, Any]) -> Demand:
        return cls(
            requests_of(pod_spec),
            dict(pod_spec.get("nodeSelector") or {}),
            tuple(pod_spec.get("tolerations") or ()),
        )


# Taints the node lifecycle controller puts on a node whose kubelet stopped reporting (unreachable)
# or reports Ready False (not-ready); either means its pods' fate cannot be confirmed.
LOST_TAINTS = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")


@dataclass
class NodeView:
    name: str
    labels: dict[str, str]
    allocatable: dict[str, float]
    taints: list[dict[str, Any]]
    ready: bool
    unschedulable: bool
    used: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TRACKED, 0.0))
    ready_status: str = "True"  # the Ready condition's status: True, False, Unknown ("" if absent)

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> NodeView:
        status = node.get("status") or {}
        alloc = status.get("allocatable") or {}
        conditions: list[Mapping[str, Any]] = status.get("conditions") or []
        ready_status = next((str(c.get("status") or "") for c in conditions if c.get("type") == "Ready"), "")
        return cls(
            name=node["metadata"]["name"],
            labels=dict(node["metadata"].get("labels") or {}),
            allocatable={k: quantity(alloc[k]) if k in alloc else 0.0 for k in TRACKED},
            taints=list((node.get("spec") or {}).get("taints") or []),
            ready=ready_status == "True",
            unschedulable=bool((node.get("spec") or {}).get("unschedulable")),
            ready_status=ready_status,
        )

    def trouble(self) -> str | None:
        """Why this node's pods are lost (phrased to follow "node X"), or None while it is healthy.

        A node without a Ready condition yet is only registering, not lost; a cordoned node
        (unschedulable) still runs its pods.
        """
        if self.ready_status in ("False", "Unknown"):
            return f"is NotReady (Ready={self.ready_status})"
        taint = next((t["key"] for t in self.taints if t.get("key") in LOST_TAINTS), None)
        return f"is {taint.removeprefix('node.kubernetes.io/')} (taint {taint})" if taint else None

    def free(self, resource: str) -> float:
        return self.allocatable[resource] - self.used[resource]


def _tolerated(taint: Mapping[str, Any], tolerations: Iterable[Mapping[str, Any]]) -> bool:
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t["key"] == taint.get("key")):
            return True
        if t.get("key") == taint.get("key") and t.get("value") == taint.get("value"):
            return True
    return False


def feasible(node: NodeView, demand: Demand) -> bool:
    if not node.ready or node.unschedulable:
        return False
    if any(node.labels.get(k) != v for k, v in demand.node_selector.items()):
        return False
    if any(
        t.get("effect") in ("NoSchedule", "NoExecute") and not _tolerated(t, demand.tolerations)
        for t in node.taints
    ):
        return False
    return all(node.free(r) >= demand.requests.get(r, 0.0) for r in TRACKED)


@dataclass(frozen=True)
class Fit:
    fits: bool
    feasible_nodes: int
    needed: int
    message: str


def gang_fits(nodes: list[NodeView], demand: Demand, count: int) -> Fit:
    """Whether `count` pods with this demand fit, one per node (that is what a training gang needs)."""
    ok = [n for n in nodes if feasible(n, demand)]
    gpus = int(demand.requests.get("nvidia.com/gpu", 0.0))
    what = f"{gpus} free nvidia.com/gpu" if gpus else "free CPU and memory"
    selector = dict(demand.node_selector)
    where = f" matching nodeSelector {selector}" if selector else ""
    needs = "1 node" if count == 1 else f"{count} nodes"
    message = f"needs {needs} with {what}{where}; {len(ok)} available"
    return Fit(fits=len(ok) >= count, feasible_nodes=len(ok), needed=count, message=message)


def reserve(nodes: list[NodeView], requests: Iterable[Mapping[str, float]]) -> None:
    """Account pods that are released but not yet bound against the most-free nodes.

    The scheduler will put them somewhere; assuming the nodes with the most free GPUs keeps the
    check conservative for gangs of large workers. One heap pass, O(pods x log nodes): this runs on
    every reconcile of every waiting gang, so it must not sort per pod.
    """
    heap = [(-n.free("nvidia.com/gpu"), i) for i, n in enumerate(nodes) if n.ready and not n.unschedulable]
    heapq.heapify(heap)
    for request in requests:
        if not heap:
            return
        _, i = heapq.heappop(heap)
        node = nodes[i]
        for r in TRACKED:
            node.used[r] += request.get(r, 0.0)
        heapq.heappush(heap, (-node.free("nvidia.com/gpu"), i))


class Cluster:
    """Shared, in-process view used by the all-or-nothing placement check.

    ``releasing`` holds gangs whose gates the operator just lifted but whose pods the index still
    shows gated (the watch lags the patch); they count as used until the index catches up.
    """

    def __init__(self) -> None:
        self.releasing: dict[tuple[str, str], list[Mapping[str, float]]] = {}

    def fit(
        self,
        job: tuple[str, str],
        nodes: Iterable[NodeView],
        usage: Iterable[tuple[str | None, Mapping[str, float]]],
        demand: Demand,
        count: int,
    ) -> Fit:
        views = [NodeView(n.name, n.labels, n.allocatable, n.taints, n.ready, n.unschedulable) for n in nodes]
        by_name = {n.name: n for n in views}
        unbound: list[Mapping[str, float]] = []
        for node_name, req in usage:
            if node_name in by_name:
                for r in TRACKED:
                    by_name[node_name].used[r] += req.get(r, 0.0)
            elif node_name is None:
                unbound.append(req)
        for key, requests in self.releasing.items():
            if key != job:  # a job's own earlier release must not block its own retry
                unbound.extend(requests)
        reserve(views, unbound)
        return gang_fits(views, demand, count)

    def hold(self, job: tuple[str, str], requests: Mapping[str, float], count: int) -> None:
        """`count` members of the job's gang were just released: they use capacity from now on."""
        self.releasing[job] = [requests] * count

    def settle(self, job: tuple[str, str]) -> None:
        """The index shows the job's pods released: their usage is counted from the index again."""
        self.releasing.pop(job, None)
