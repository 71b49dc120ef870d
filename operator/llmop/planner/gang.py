"""Gang admission, decided here only: whether the operator's own scheduling gate holds a gang, the
all-or-nothing capacity check (``capacity``), releasing the gang, and the capacity a released gang
holds until the scheduler binds it.

Without a gang scheduler the operator creates workers behind ``naming.GANG_GATE`` and lifts it only
when every worker fits on a distinct node; Kueue lifts its own gate; Volcano and coscheduling need
no gate at all. The controller asks ``observe`` for the capacity seen, the planner decides with
``admitted``, and the controller records what it released with ``released``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from llmop import capacity, naming
from llmop import conditions as cond
from llmop.builders import JobRef, pod, workers
from llmop.observe import PodView
from llmop.planner import elastic
from llmop.planner.context import Pass
from llmop_contract.api.v1alpha1.status import JobReason, JobState

CAPACITY_RECHECK_SECONDS = 2.0


def demand(job: JobRef) -> capacity.Demand:
    """What each worker asks of its node, from the spec (as the worker pod's resources and placement)."""
    placement = pod.placement(job)
    return capacity.Demand(
        requests=capacity.requests_of_resources(workers.resources(job)),
        node_selector=dict(placement.get("nodeSelector") or {}),
        tolerations=tuple(placement.get("tolerations") or ()),
    )


def operator_gated(job: JobRef) -> bool:
    """The operator's own gate holds the gang (no gang scheduler, no Kueue)."""
    return workers.scheduling_gates(job) == [naming.GANG_GATE]


def observe(
    job: JobRef,
    pods: list[PodView],
    attempt: int,
    cluster: capacity.Cluster,
    nodes: Iterable[capacity.NodeView],
    usage: Iterable[tuple[str | None, Mapping[str, float]]],
) -> capacity.Fit | None:
    """The capacity the planner decides on: None unless the operator's gate holds current workers."""
    key = (job.namespace, job.name)
    if not any(p.gated for p in pods):
        cluster.settle(key)  # the index shows them released now
    current = [p for p in pods if p.attempt == attempt]
    if not any(p.gated for p in current) or not operator_gated(job):
        return None
    n = job.spec.workers.num_nodes
    if all(p.gated for p in current):
        return cluster.fit(key, nodes, usage, demand(job), n)
    # Part of the gang is already released: the rest is only our watch lagging behind our own
    # patches. Re-checking would count the released half against the other half.
    return capacity.Fit(True, n, n, "the gang was admitted; releasing the remaining workers")


def room(
    job: JobRef,
    pods: list[PodView],
    attempt: int,
    cluster: capacity.Cluster,
    nodes: Iterable[capacity.NodeView],
    usage: Iterable[tuple[str | None, Mapping[str, float]]],
) -> int | None:
    """Nodes that would take one more worker each beside a running gang the operator gates itself:
    the nodes its workers run on are left out (one worker per node). None: not ours to say."""
    current = [p for p in pods if p.attempt == attempt]
    if not operator_gated(job) or not current or any(p.gated or not p.node for p in current):
        return None
    taken = {p.node for p in current}
    free = [n for n in nodes if n.name not in taken]
    return cluster.fit((job.namespace, job.name), free, usage, demand(job), 1).feasible_nodes


def released(cluster: capacity.Cluster, job: JobRef, count: int) -> None:
    """``count`` workers were just ungated: they hold capacity until the index shows them bound."""
    cluster.hold((job.namespace, job.name), demand(job).requests, count)


def admitted(p: Pass, current: list[PodView]) -> bool:
    """Whether placement may go on: no gated workers, or the gate is lifted now (``plan.ungate``)."""
    gated = [x for x in current if x.gated]
    if not gated:
        return True
    fit = p.seen.fit
    if fit is None:
        # Someone else's gate (Kueue admission): the whole group is released together by them.
        queue = p.spec.scheduling.queue_name
        message = f"{len(gated)} workers wait for Kueue to admit the pod group (queue {queue})"
        p.condition(cond.GANG_SCHEDULED, False, JobReason.AWAITING_ADMISSION, message)
        p.status.state = JobState.PENDING
        return False
    if not fit.fits:
        if elastic.shrink(p, p.status.attempt, fit):
            return False
        p.condition(cond.GANG_SCHEDULED, False, JobReason.INSUFFICIENT_CAPACITY, fit.message)
        p.status.state = JobState.PENDING
        # Capacity frees up without any event on this job's children: look again soon.
        p.plan.requeue_after = min(p.plan.requeue_after or CAPACITY_RECHECK_SECONDS, CAPACITY_RECHECK_SECONDS)
        return False
    p.plan.ungate = [x.name for x in gated]
    p.status.capacity_short_since = None
    p.condition(cond.GANG_SCHEDULED, True, JobReason.GANG_ADMITTED, fit.message)
    return True
