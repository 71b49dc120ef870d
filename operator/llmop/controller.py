"""Carries out one reconcile pass for a job: observe, plan (``llmop.planner``), act, report.

The job's status is parsed into its typed model once (when a daemon first reads it) and serialised
once, in ``write_status``; in between the planner reads and writes the model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import kopf
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from llmop import capacity, events, metrics, naming, nodewatch, progress
from llmop import conditions as cond
from llmop.builders import JobRef, compress, config, prepare, scheduling, serving, storage, workers
from llmop.kube import ChildConflict, ChildError, Kube, Leftover
from llmop.observe import BatchJobView, PodView, ServingView, controller_uid, inference_service_view
from llmop.planner import JobSnapshot, Observed, Plan, errors, gang, plan, remote, resume
from llmop_contract.api.v1alpha1.job import KIND, LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.status import ConditionStatus, JobReason, JobState, LLMTrainingJobStatus

log = logging.getLogger("llmop.controller")
_WARNING_REASONS = {
    JobReason.WORKER_FAILED,
    JobReason.WORKER_DISRUPTED,
    JobReason.WORKER_LOST,
    JobReason.INSUFFICIENT_CAPACITY,
    JobReason.UNSCHEDULABLE,
}


@dataclass
class JobMemory:
    """What one job's daemon remembers between passes.

    The daemon is the only writer of its job's status, so the status it last wrote is authoritative;
    the watched body can lag behind our own patch and must not be used to recount restarts.
    """

    status: LLMTrainingJobStatus | None = None
    last_scrape: float = 0.0
    attempt_started: float = field(default_factory=time.monotonic)
    done: dict[tuple[Any, ...], float] = field(default_factory=dict)
    error_streak: int = 0  # failed passes in a row (the retry backoff)

    def not_recently(self, action: tuple[Any, ...], items: list[Any], window: float = 15.0) -> list[Any]:
        """The items not acted on within `window` seconds, now marked as acted on.

        Idempotent actions may repeat, but while the watch catches up with our own writes a repeat
        is a wasted request; after the window it is a genuine retry (e.g. a pod deleted meanwhile).
        """
        now = time.monotonic()
        fresh = [i for i in items if now - self.done.get((*action, i), -window) >= window]
        for i in fresh:
            self.done[(*action, i)] = now
        if len(self.done) > 4096:  # old attempts' entries
            self.done = {k: v for k, v in self.done.items() if now - v < window}
        return fresh

    def forget(self, action: tuple[Any, ...], item: Any) -> None:
        self.done.pop((*action, item), None)


# Gangs released by this operator, shared by every job's daemon (see ``planner.gang``).
CLUSTER = capacity.Cluster()


@dataclass(frozen=True)
class Indexes:
    """Kopf's live indexes (see handlers.py), keyed by (namespace, job) or None for cluster-wide."""

    worker_pods: Any
    compress_pods: Any
    batch_jobs: Any
    deployments: Any
    nodes: Any
    resource_usage: Any
    node_health: Any  # by node name (see nodewatch.py)


def _store(index: Any, key: Any) -> list[Any]:
    try:
        return list(index.get(key, []))
    except TypeError:
        return []


async def reconcile_once(
    kube: Kube,
    body: kopf.Body,
    memory: JobMemory,
    indexes: Indexes,
    progress_interval: float,
) -> float | None:
    """One pass; returns seconds until the next pass is due without events (None: resync default)."""
    started = time.perf_counter()
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    spec = LLMTrainingJobSpec.model_validate(body.get("spec", {}))
    status = memory.status
    if status is None:  # parsed once: later passes start from the status this daemon wrote
        status = LLMTrainingJobStatus.model_validate(dict(body.get("status") or {}))
    job = JobSnapshot(name, namespace, meta["uid"], meta.get("generation", 1), spec, status)
    # Children are built for the current attempt's size (an elastic gang's, see planner.elastic).
    ref = JobRef(name, namespace, meta["uid"], spec.at_size(status.current_nodes or spec.workers.num_nodes))

    # Only children whose controller is this job (by UID): what an earlier job of the same name
    # left behind is not ours, and creating over it removes it first (``kube.Leftover``).
    uid = job.uid
    every_pod: list[PodView] = _store(indexes.worker_pods, (namespace, name))
    pods = [v for v in every_pod if v.owner_uid == uid]
    leftovers = [v for v in every_pod if v.owner_uid != uid and v.owner == f"{KIND}/{name}"]
    prepare_jobs = [
        v for v in _store(indexes.batch_jobs, (namespace, name, naming.ROLE_PREPARE)) if v.owner_uid == uid
    ]
    compress_jobs: list[BatchJobView] = [
        v for v in _store(indexes.batch_jobs, (namespace, name, naming.ROLE_COMPRESS)) if v.owner_uid == uid
    ]
    # Compression and preparation pods belong to our batch Jobs.
    ours = {j.uid for j in (*compress_jobs, *prepare_jobs)}
    now = datetime.now(UTC)
    seen = Observed(
        pods=pods,
        prepare=next((j for j in prepare_jobs if not j.prepare_phase), None),
        prepare_phases=[j for j in prepare_jobs if j.prepare_phase],
        now=now,
        compress_jobs=compress_jobs,
        compress_pods=[v for v in _store(indexes.compress_pods, (namespace, name)) if v.owner_uid in ours],
    )
    if cond.holds(status.conditions, cond.SUCCEEDED):
        seen = await observe_serving(kube, ref, seen, indexes)
    growable = ref.spec.workers.num_nodes < ref.spec.workers.largest
    if any(p.gated for p in pods) or growable:
        nodes, usage = _store(indexes.nodes, None), _store(indexes.resource_usage, None)
    else:
        nodes, usage = [], []
    fit = gang.observe(ref, pods, status.attempt or 1, CLUSTER, nodes, usage)
    room = gang.room(ref, pods, status.attempt or 1, CLUSTER, nodes, usage) if growable else None
    lost = nodewatch.lost_nodes(indexes.node_health, pods)
    seen = dataclasses.replace(seen, fit=fit, lost_nodes=lost, room=room)
    result = plan(job, seen)
    # A deletion destroys the evidence its decision was made from (the failed pod of a counted
    # restart): the status recording the decision (new attempt, restartCount) goes out first, so an
    # action or status write that fails half-way can neither lose the restart nor recount it as a
    # lost worker. Creates are repeated from the same evidence, so they go first and status after.
    decided = bool(result.delete_pods or result.force_delete_pods or result.delete_batch_jobs)
    if decided:
        await write_status(kube, ref, status, result, memory, body)
    try:
        await act(kube, ref, result, body, pods, memory, leftovers)
    except Exception as e:  # every failure is reported on the job, then retried or made final
        problem = problem_of(e)
        memory.error_streak += 1
        metrics.RECONCILE_ERRORS.labels(namespace).inc()
        level = logging.INFO if problem.kind == errors.ProblemKind.LEFTOVER else logging.WARNING
        log.log(level, "%s/%s: %s (%s)", namespace, name, problem.message, problem.kind.value)
        base = dataclasses.replace(job, status=result.status) if decided else job
        failed = errors.act_failed(base, seen, problem, memory.error_streak)
        await write_status(kube, ref, base.status, failed, memory, body)
        return failed.requeue_after
    memory.error_streak = 0
    if decided:
        # Written already: what is left to say is the recovery and the progress.
        done = dataclasses.replace(job, status=result.status)
        result = Plan(status=result.status.model_copy(deep=True), requeue_after=result.requeue_after)
        errors.reconciled(done, result, seen)
        await write_status(kube, ref, done.status, result, memory, body)
    else:
        errors.reconciled(job, result, seen)
        await report_progress(job, result, pods, memory, progress_interval)
        await write_status(kube, ref, status, result, memory, body)
    metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
    return result.requeue_after


def problem_of(e: BaseException) -> errors.Problem:
    """What a failed action means for the job (see ``planner.errors``)."""
    kind, reason = errors.ProblemKind.TRANSIENT, JobReason.API_ERROR
    if isinstance(e, Leftover):
        kind, reason = errors.ProblemKind.LEFTOVER, JobReason.LEFTOVER_PENDING
    elif isinstance(e, ChildConflict):
        kind, reason = errors.ProblemKind.PERMANENT, JobReason.NAME_CONFLICT
    elif isinstance(e, ChildError) and e.quota_refused:
        reason = JobReason.QUOTA_EXCEEDED
    elif isinstance(e, ChildError) and e.permanent:
        kind = errors.ProblemKind.PERMANENT
        reason = JobReason.FORBIDDEN if e.status == 403 else JobReason.CHILD_REJECTED
    message = str(e) or type(e).__name__
    return errors.Problem(kind, reason, message[:_MESSAGE_LIMIT])


_MESSAGE_LIMIT = 4096
_T = TypeVar("_T")


async def _each(
    items: Sequence[_T], call: Callable[[_T], Awaitable[Any]], forget: Callable[[_T], None] | None = None
) -> None:
    """Run ``call`` on every item concurrently; every call finishes, then the first error is raised
    (after ``forget`` of each failed item, so a remembered action is retried on the next pass)."""
    outcomes = await asyncio.gather(*(call(i) for i in items), return_exceptions=True)
    failed = [(i, o) for i, o in zip(items, outcomes, strict=True) if isinstance(o, BaseException)]
    for item, _ in failed:
        if forget is not None:
            forget(item)
    if failed:
        raise failed[0][1]


async def delete_workload(kube: Kube, namespace: str, name: str) -> None:
    """Give a Kueue Workload back; without Kueue's CRDs there is none (and nothing admitted the pods)."""
    try:
        await kube.delete(naming.KUEUE_WORKLOAD_API, "Workload", namespace, name)
    except ResourceNotFoundError:
        log.warning("no Kueue Workload API to delete %s/%s from: is Kueue installed?", namespace, name)


async def observe_serving(kube: Kube, ref: JobRef, seen: Observed, indexes: Indexes) -> Observed:
    """The serving Deployment from the index, or the InferenceService (no index: its CRD is optional)."""
    if ref.spec.serving is None or not ref.spec.serving.kserve:
        views: list[ServingView] = [
            v for v in _store(indexes.deployments, (ref.namespace, ref.name)) if v.owner_uid == ref.uid
        ]
        return dataclasses.replace(seen, serving=views[0] if views else None)
    try:
        obj = await kube.get(
            serving.KSERVE_API, "InferenceService", ref.namespace, naming.serving_name(ref.name)
        )
    except ResourceNotFoundError:
        return dataclasses.replace(
            seen, serving_unavailable="serving.kserve is true but the KServe CRDs are not installed"
        )
    ours = obj is not None and controller_uid(obj) == ref.uid
    return dataclasses.replace(seen, serving=inference_service_view(obj) if obj and ours else None)


async def act(
    kube: Kube,
    ref: JobRef,
    result: Plan,
    body: kopf.Body,
    pods: list[PodView],
    memory: JobMemory,
    leftovers: Sequence[PodView] = (),
) -> None:
    ns = ref.namespace
    if result.delete_job:
        await kube.delete_job(ns, ref.name)
        return
    if result.ensure_base:
        base = [workers.build_service_account(ref), config.build_config_map(ref), workers.build_service(ref)]
        if claim := storage.build_claim(ref):
            base.append(claim)
        await _each(base, kube.create)
        if group := scheduling.build_pod_group(ref):
            if problem := await kube.create_optional(group):
                await events.post(kube, body, "PodGroupUnavailable", problem, warning=True)
    if result.create_prepare:
        await kube.create(prepare.build_prepare_job(ref))
    if result.create_prepare_phase is not None:
        await kube.create(prepare.build_phase_job(ref, result.create_prepare_phase))
    if result.create_compress:
        todo = memory.not_recently(("compress",), result.create_compress)
        await _each(
            todo,
            lambda st: kube.create(compress.build_compress_job(ref, st)),
            lambda st: memory.forget(("compress",), st),
        )
    if result.delete_batch_jobs:
        await _each(result.delete_batch_jobs, lambda j: kube.delete("batch/v1", "Job", ns, j))
    if result.delete_pods:
        await _each(result.delete_pods, lambda p: kube.delete_pod(ns, p))
    if result.force_delete_pods:
        await _each(result.force_delete_pods, lambda p: kube.delete_pod(ns, p, grace_seconds=0))
    if result.delete_workloads:
        # Asked for on every pass until the old attempt's pods are gone: once per window is enough.
        todo = memory.not_recently(("workload",), result.delete_workloads)
        await _each(
            todo,
            lambda w: delete_workload(kube, ns, w),
            lambda w: memory.forget(("workload",), w),
        )
    if result.create_workers and leftovers:
        # Workers of an earlier job of this name still hold names (and nodes) of the new gang:
        # creating around them would start a partial gang that restarts as soon as one of them
        # goes. Remove them (that pod, by UID, never a namesake) and create the gang once they are gone.
        going = [v for v in leftovers if not v.deleting]
        await _each(going, lambda v: kube.delete("v1", "Pod", ns, v.name, uid=v.uid))
        raise Leftover("Pod", leftovers[0].name)
    if result.create_workers:
        attempt = result.status.attempt
        # The index lags our own creates; re-posting every pass would only collect 409s.
        todo = memory.not_recently(("create", attempt), result.create_workers)
        await _each(
            todo,
            lambda i: kube.create(workers.build_worker(ref, i, attempt)),
            lambda i: memory.forget(("create", attempt), i),
        )
    if result.serve_model is not None:
        manifests = serving.build(ref, result.serve_model, result.serve_engine)
        # Server-side apply is idempotent, but a finished job is reconciled on every resync: apply
        # when the desired objects change, and re-assert them every few minutes (someone edited them).
        digest = hashlib.sha256(json.dumps(manifests, sort_keys=True).encode()).hexdigest()[:16]
        if memory.not_recently(("serve", digest), [ref.name], window=300):
            try:
                for manifest in manifests:
                    await kube.apply(manifest)
            except Exception:
                memory.forget(("serve", digest), ref.name)  # a failed apply is retried on the next pass
                raise
    if result.remove_serving:
        name = naming.serving_name(ref.name)
        await kube.delete("apps/v1", "Deployment", ns, name)
        await kube.delete("v1", "Service", ns, name)
        try:
            await kube.delete(serving.KSERVE_API, "InferenceService", ns, name)
        except ResourceNotFoundError:
            pass  # KServe not installed: nothing of that kind can exist
    if result.ungate:
        gang.released(CLUSTER, ref, len(result.ungate))
        gated = {p.name: p.gates for p in pods}
        action = ("ungate", result.status.attempt)
        todo = memory.not_recently(action, result.ungate)
        await _each(
            todo,
            lambda p: kube.remove_scheduling_gate(ns, p, naming.GANG_GATE, gated.get(p)),
            lambda p: memory.forget(action, p),
        )


async def report_progress(
    job: JobSnapshot, result: Plan, pods: list[PodView], memory: JobMemory, interval: float
) -> None:
    if result.status.state != JobState.RUNNING or time.monotonic() - memory.last_scrape < interval:
        return
    rank0 = next((p for p in pods if p.index == 0 and p.attempt == result.status.attempt and p.ip), None)
    if rank0 is None or rank0.ip is None:
        return
    memory.last_scrape = time.monotonic()
    values = await progress.scrape(rank0.ip, job.spec.workers.metrics_port)
    if values is None:
        return
    now = datetime.now(UTC)
    result.status.progress = progress.to_status(values, now, result.status.start_time, job.spec)
    if (lost := progress.settle_interruption(result.status, values, now)) is not None:
        metrics.RESTART_LOST.labels(job.namespace).observe(lost)
    resume.report(job, result, result.status.attempt, resume.Resumed.scraped(values))
    remote.scraped(job, result, values, now)
    metrics.JOB_STEP.labels(job.namespace, job.name).set(values.get("step", 0))
    if "loss" in values:
        metrics.JOB_LOSS.labels(job.namespace, job.name).set(values["loss"])
    if "tokensPerSecond" in values:
        metrics.JOB_TOKENS.labels(job.namespace, job.name).set(values["tokensPerSecond"])
    if result.status.progress is not None and result.status.progress.goodput is not None:
        metrics.JOB_GOODPUT.labels(job.namespace, job.name).set(result.status.progress.goodput)


async def write_status(
    kube: Kube,
    ref: JobRef,
    before: LLMTrainingJobStatus,
    result: Plan,
    memory: JobMemory,
    body: kopf.Body,
) -> None:
    ns, name = ref.namespace, ref.name
    keyed = [e for e in result.events if e.key is not None]
    for event in keyed:  # before the write that records them: see llmop.events
        await events.post(kube, body, event.reason, event.message, event.warning, event.key)
    if result.status != before:
        # The one place the typed status becomes a manifest again. A merge patch keeps keys it does
        # not mention: a field the plan dropped is sent as null.
        wire = result.status.to_wire()
        dropped = {key: None for key in before.to_wire() if key not in wire}
        await kube.patch_job_status(ns, name, {**wire, **dropped})
    memory.status = result.status
    # One Event per reason and pass: a failure flips Running off and Failed on with the same reason,
    # and two identical Events would read as two failures (nor a restart's transitions beside its
    # keyed Event).
    posted: set[str] = {e.reason for e in keyed}
    unkeyed: list[Awaitable[None]] = []
    for t in sorted(result.transitions, key=lambda t: t.status != ConditionStatus.TRUE):
        warning = (
            (
                t.status == ConditionStatus.TRUE
                and (t.type in (cond.FAILED, cond.RESTARTING) or t.reason in _WARNING_REASONS)
            )
            or (
                # A pod that cannot start for a missing Secret/ConfigMap/key: the user must act.
                t.reason == JobReason.CONTAINER_CONFIG_ERROR
            )
            or (
                t.type == cond.SYNCED
                and t.status == ConditionStatus.FALSE
                and t.reason != JobReason.LEFTOVER_PENDING
            )
        )
        if t.reason not in posted:
            posted.add(t.reason)
            unkeyed.append(events.post(kube, body, t.reason, t.message, warning))
        record_transition(ns, t)
    unkeyed += [
        events.post(kube, body, e.reason, e.message, e.warning) for e in result.events if e.key is None
    ]
    await asyncio.gather(*unkeyed)  # concurrently, as Kopf's poster did: a pass waits for the slowest
    if result.gang_running_since is not None:
        metrics.TIME_TO_RUNNING.observe(time.monotonic() - memory.attempt_started)
    if len(result.create_workers) == ref.spec.workers.num_nodes:
        memory.attempt_started = time.monotonic()  # a whole gang was just created
    for stage in result.finished_stages:
        metrics.record_stage(ns, name, stage)
    state = result.status.state
    metrics.set_state(ns, name, state.value if state else None)
    metrics.JOB_RESTARTS.labels(ns, name).set(result.status.restart_count)
    metrics.record_preparation(ns, name, result.status.preparation)


def record_transition(namespace: str, t: cond.Transition) -> None:
    if t.status != ConditionStatus.TRUE:
        return
    if t.type == cond.CREATED:
        metrics.JOBS_CREATED.labels(namespace).inc()
    elif t.type == cond.SUCCEEDED:
        metrics.JOBS_SUCCEEDED.labels(namespace).inc()
    elif t.type == cond.FAILED:
        metrics.JOBS_FAILED.labels(namespace, t.reason).inc()
    elif t.type == cond.RESTARTING:
        metrics.JOBS_RESTARTED.labels(namespace, t.reason).inc()
