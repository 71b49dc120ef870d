"""Carries out one reconcile pass for a job: observe, plan (reconcile.py), act, report."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from llmop import capacity, metrics, naming, progress
from llmop import conditions as cond
from llmop.builders import JobRef, compress, config, prepare, scheduling, serving, storage, workers
from llmop.kube import Kube
from llmop.observe import BatchJobView, PodView, ServingView, inference_service_view
from llmop.reconcile import JobSnapshot, Observed, Plan, plan
from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec

log = logging.getLogger("llmop.controller")
_WARNING_REASONS = {"WorkerFailed", "WorkerDisrupted", "WorkerLost", "InsufficientCapacity", "Unschedulable"}


@dataclass
class JobMemory:
    """What one job's daemon remembers between passes.

    The daemon is the only writer of its job's status, so the status it last wrote is authoritative;
    the watched body can lag behind our own patch and must not be used to recount restarts.
    """

    status: dict[str, Any] | None = None
    last_scrape: float = 0.0
    attempt_started: float = field(default_factory=time.monotonic)
    done: dict[tuple[Any, ...], float] = field(default_factory=dict)

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


class Cluster:
    """Shared, in-process view used by the all-or-nothing placement check.

    ``releasing`` holds gangs whose gates the operator just lifted but whose pods the index still
    shows gated (the watch lags the patch); they count as used until the index catches up.
    """

    def __init__(self) -> None:
        self.releasing: dict[tuple[str, str], list[dict[str, float]]] = {}

    def fit(
        self,
        job: tuple[str, str],
        nodes: Iterable[capacity.NodeView],
        usage: Iterable[tuple[str | None, dict[str, float]]],
        pod_spec: Mapping[str, Any],
        count: int,
    ) -> capacity.Fit:
        views = [
            capacity.NodeView(n.name, n.labels, n.allocatable, n.taints, n.ready, n.unschedulable)
            for n in nodes
        ]
        by_name = {n.name: n for n in views}
        unbound: list[dict[str, float]] = []
        for node_name, req in usage:
            if node_name in by_name:
                for r in capacity.TRACKED:
                    by_name[node_name].used[r] += req.get(r, 0.0)
            elif node_name is None:
                unbound.append(req)
        for key, requests in self.releasing.items():
            if key != job:  # a job's own earlier release must not block its own retry
                unbound.extend(requests)
        capacity.reserve(views, unbound)
        return capacity.gang_fits(views, pod_spec, count)


CLUSTER = Cluster()


@dataclass(frozen=True)
class Indexes:
    """Kopf's live indexes (see handlers.py), keyed by (namespace, job) or None for cluster-wide."""

    worker_pods: Any
    compress_pods: Any
    batch_jobs: Any
    deployments: Any
    nodes: Any
    resource_usage: Any


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
    status = memory.status if memory.status is not None else dict(body.get("status") or {})
    job = JobSnapshot(name, namespace, meta["uid"], meta.get("generation", 1), spec, status)
    ref = JobRef(name, namespace, meta["uid"], spec)

    pods: list[PodView] = _store(indexes.worker_pods, (namespace, name))
    prepare_jobs: list[BatchJobView] = _store(indexes.batch_jobs, (namespace, name, naming.ROLE_PREPARE))
    now = datetime.now(UTC)
    seen = Observed(
        pods=pods,
        prepare=prepare_jobs[0] if prepare_jobs else None,
        now=now,
        compress_jobs=_store(indexes.batch_jobs, (namespace, name, naming.ROLE_COMPRESS)),
        compress_pods=_store(indexes.compress_pods, (namespace, name)),
    )
    if cond.is_true(status.get("conditions") or [], cond.SUCCEEDED):
        seen = await observe_serving(kube, ref, seen, indexes)
    attempt = status.get("attempt") or 1
    if not any(p.gated for p in pods):
        CLUSTER.releasing.pop((namespace, name), None)  # the index shows them released now
    current = [p for p in pods if p.attempt == attempt]
    if any(p.gated for p in current) and workers.scheduling_gates(ref) == [naming.GANG_GATE]:
        if all(p.gated for p in current):
            worker = workers.build_worker(ref, 0, attempt)["spec"]
            nodes, usage = _store(indexes.nodes, None), _store(indexes.resource_usage, None)
            fit = CLUSTER.fit((namespace, name), nodes, usage, worker, spec.workers.num_nodes)
        else:
            # Part of the gang is already released: the rest is only our watch lagging behind our
            # own patches. Re-checking would count the released half against the other half.
            n = spec.workers.num_nodes
            fit = capacity.Fit(True, n, n, "the gang was admitted; releasing the remaining workers")
        seen = dataclasses.replace(seen, fit=fit)
    result = plan(job, seen)
    await act(kube, ref, result, body, pods, memory)
    await report_progress(ref, result, pods, memory, progress_interval)
    await write_status(kube, ref, status, result, memory, body)
    metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
    return result.requeue_after


async def observe_serving(kube: Kube, ref: JobRef, seen: Observed, indexes: Indexes) -> Observed:
    """The serving Deployment from the index, or the InferenceService (no index: its CRD is optional)."""
    if ref.spec.serving is None or not ref.spec.serving.kserve:
        views: list[ServingView] = _store(indexes.deployments, (ref.namespace, ref.name))
        return dataclasses.replace(seen, serving=views[0] if views else None)
    try:
        obj = await kube.get(
            serving.KSERVE_API, "InferenceService", ref.namespace, naming.serving_name(ref.name)
        )
    except ResourceNotFoundError:
        return dataclasses.replace(
            seen, serving_unavailable="serving.kserve is true but the KServe CRDs are not installed"
        )
    return dataclasses.replace(seen, serving=inference_service_view(obj) if obj else None)


async def act(
    kube: Kube, ref: JobRef, result: Plan, body: kopf.Body, pods: list[PodView], memory: JobMemory
) -> None:
    ns = ref.namespace
    if result.delete_job:
        await kube.delete_job(ns, ref.name)
        return
    if result.ensure_base:
        base = [workers.build_service_account(ref), config.build_config_map(ref), workers.build_service(ref)]
        if claim := storage.build_claim(ref):
            base.append(claim)
        await asyncio.gather(*(kube.create(m) for m in base))
        if group := scheduling.build_pod_group(ref):
            if problem := await kube.create_optional(group):
                kopf.warn(body, reason="PodGroupUnavailable", message=problem)
    if result.create_prepare:
        await kube.create(prepare.build_prepare_job(ref))
    if result.create_compress:
        todo = memory.not_recently(("compress",), result.create_compress)
        await asyncio.gather(*(kube.create(compress.build_compress_job(ref, st)) for st in todo))
    if result.delete_batch_jobs:
        await asyncio.gather(*(kube.delete("batch/v1", "Job", ns, j) for j in result.delete_batch_jobs))
    if result.delete_pods:
        await asyncio.gather(*(kube.delete_pod(ns, p) for p in result.delete_pods))
    if result.create_workers:
        attempt = result.status["attempt"]
        # The index lags our own creates; re-posting every pass would only collect 409s.
        todo = memory.not_recently(("create", attempt), result.create_workers)
        manifests = [workers.build_worker(ref, i, attempt) for i in todo]
        await asyncio.gather(*(kube.create(m) for m in manifests))
    if result.serve_model is not None:
        manifests = serving.build(ref, result.serve_model)
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
        worker = workers.build_worker(ref, 0, result.status["attempt"])["spec"]
        CLUSTER.releasing[(ns, ref.name)] = [capacity.requests_of(worker)] * len(result.ungate)
        gated = {p.name: p.gates for p in pods}
        todo = memory.not_recently(("ungate", result.status["attempt"]), result.ungate)
        await asyncio.gather(
            *(kube.remove_scheduling_gate(ns, p, naming.GANG_GATE, gated.get(p)) for p in todo)
        )


async def report_progress(
    ref: JobRef, result: Plan, pods: list[PodView], memory: JobMemory, interval: float
) -> None:
    if result.status.get("state") != "Running" or time.monotonic() - memory.last_scrape < interval:
        return
    rank0 = next(
        (p for p in pods if p.index == 0 and p.attempt == result.status.get("attempt") and p.ip), None
    )
    if rank0 is None or rank0.ip is None:
        return
    memory.last_scrape = time.monotonic()
    values = await progress.scrape(rank0.ip, ref.spec.workers.metrics_port)
    if values is None:
        return
    result.status["progress"] = progress.to_status(values, datetime.now(UTC))
    metrics.JOB_STEP.labels(ref.namespace, ref.name).set(values.get("step", 0))
    if "loss" in values:
        metrics.JOB_LOSS.labels(ref.namespace, ref.name).set(values["loss"])
    if "tokensPerSecond" in values:
        metrics.JOB_TOKENS.labels(ref.namespace, ref.name).set(values["tokensPerSecond"])


async def write_status(
    kube: Kube, ref: JobRef, before: dict[str, Any], result: Plan, memory: JobMemory, body: kopf.Body
) -> None:
    ns, name = ref.namespace, ref.name
    if result.status != before:
        # A merge patch keeps keys it does not mention: a field the plan dropped is sent as null.
        dropped = {key: None for key in before if key not in result.status}
        await kube.patch_job_status(ns, name, {**result.status, **dropped})
    memory.status = result.status
    # One Event per reason and pass: a failure flips Running off and Failed on with the same reason,
    # and two identical Events would read as two failures.
    posted: set[str] = set()
    for t in sorted(result.transitions, key=lambda t: t.status != "True"):
        warning = t.status == "True" and (
            t.type in (cond.FAILED, cond.RESTARTING) or t.reason in _WARNING_REASONS
        )
        if t.reason not in posted:
            posted.add(t.reason)
            (kopf.warn if warning else kopf.info)(body, reason=t.reason, message=t.message)
        record_transition(ns, t)
    if result.gang_running_since is not None:
        metrics.TIME_TO_RUNNING.observe(time.monotonic() - memory.attempt_started)
    if len(result.create_workers) == ref.spec.workers.num_nodes:
        memory.attempt_started = time.monotonic()  # a whole gang was just created
    for stage in result.finished_stages:
        metrics.record_stage(ns, name, stage)
    metrics.set_state(ns, name, result.status.get("state"))
    metrics.JOB_RESTARTS.labels(ns, name).set(result.status.get("restartCount", 0))


def record_transition(namespace: str, t: cond.Transition) -> None:
    if t.status != "True":
        return
    if t.type == cond.CREATED:
        metrics.JOBS_CREATED.labels(namespace).inc()
    elif t.type == cond.SUCCEEDED:
        metrics.JOBS_SUCCEEDED.labels(namespace).inc()
    elif t.type == cond.FAILED:
        metrics.JOBS_FAILED.labels(namespace, t.reason).inc()
    elif t.type == cond.RESTARTING:
        metrics.JOBS_RESTARTED.labels(namespace, t.reason).inc()
