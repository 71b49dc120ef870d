"""Failure detection from node events: which nodes of a job's pods are gone or not ready, and waking
the jobs that have workers on a node as soon as its health changes.

Without this, a deleted or unreachable node is noticed only when the pod garbage collector removes
its pods (40 s or more later) and the job shows Running meanwhile. Two indexes keep it cheap at
hundreds of jobs on thousands of nodes: the health of each node by name (a lookup per node of a job's
pods in every pass, nothing more), and the jobs with workers on each node (a node event wakes only
those). Node heartbeats change nothing here: a job is woken only when its node's health changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import kopf

from llmop import naming
from llmop.capacity import NodeView
from llmop.observe import PodView

# A node that is missing from the index without a deletion having been seen (e.g. it was deleted
# while the operator was down, or a watch was re-listed) counts as gone only after this long: the
# pod that names a node newly added can be seen before the node itself.
MISSING_GRACE_SECONDS = 10.0
DELETED = "was deleted"
NOT_FOUND = "is not found"

Wake = Callable[[str | None, str | None], None]
_wake: Wake = lambda namespace, job: None  # noqa: E731 - replaced by handlers.py (use_wakeup)
_health: dict[str, str | None] = {}  # last trouble seen per node: a change wakes its jobs
_deleted: dict[str, float] = {}  # nodes whose deletion was seen, and when
_missing: dict[str, float] = {}  # nodes named by a pod but in no index, since when


def use_wakeup(wake: Wake) -> None:
    """How to wake a job's daemon (``handlers._wake``); set once by handlers.py."""
    global _wake
    _wake = wake


@kopf.index("nodes")
async def node_health(name: str, body: kopf.Body, **_: Any) -> dict[str, str]:
    """Each node's trouble ("" when healthy); a node absent from this index does not exist."""
    return {name: NodeView.from_node(body).trouble() or ""}


@kopf.index("pods", labels={naming.JOB_NAME_LABEL: kopf.PRESENT, naming.ROLE_LABEL: naming.ROLE_WORKER})
async def worker_nodes(
    namespace: str | None, labels: kopf.Labels, spec: kopf.Spec, **_: Any
) -> dict[str, tuple[str | None, str]] | None:
    """The jobs with a worker on each node (node name -> (namespace, job) per pod)."""
    node = spec.get("nodeName")
    return {node: (namespace, labels[naming.JOB_NAME_LABEL])} if node else None


@kopf.on.event("nodes")
async def node_changed(*, type: str, name: str, body: kopf.Body, **kwargs: Any) -> None:
    # Kopf updates every index before it calls event handlers, so the woken daemons read this
    # event's node health already.
    if type == "DELETED":
        _deleted[name] = time.monotonic()
        trouble: str | None = DELETED
        before = _health.pop(name, None)
    else:
        _deleted.pop(name, None)
        trouble = NodeView.from_node(body).trouble()
        before = _health.get(name)
        _health[name] = trouble
    if trouble == before:
        return
    for namespace, job in set(_values(kwargs["worker_nodes"], name)):  # Kopf passes indexes by name
        _wake(namespace, job)


def lost_nodes(node_health: Any, pods: Iterable[PodView], now: float | None = None) -> dict[str, str]:
    """The nodes of these pods that are gone or not ready, each with what happened to it."""
    now = time.monotonic() if now is None else now
    lost: dict[str, str] = {}
    for node in {p.node for p in pods if p.node}:
        seen = _values(node_health, node)
        if seen:
            _missing.pop(node, None)
            if seen[0]:
                lost[node] = seen[0]
        elif node in _deleted:
            lost[node] = DELETED
        elif now - _missing.setdefault(node, now) >= MISSING_GRACE_SECONDS:
            lost[node] = NOT_FOUND
    _forget_old(now)
    return lost


def _values(index: Any, key: str) -> list[Any]:
    try:
        return list(index.get(key, []))
    except (AttributeError, TypeError):
        return []


def _forget_old(now: float, keep: float = 3600.0) -> None:
    """Drop what is an hour old: its pods are long gone (or the garbage collector has them)."""
    for memo in (_deleted, _missing):
        if len(memo) > 1024:
            for node in [n for n, since in memo.items() if now - since > keep]:
                del memo[node]
