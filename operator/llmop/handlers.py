"""Kopf entry points. Thin: indexes feed observations, one daemon per job runs the reconcile loop.

Index and event handlers are coroutines on purpose: Kopf runs sync handlers in threads, which costs
thread hops per pod event and would make waking a daemon's asyncio.Event thread-unsafe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from llmop import capacity, controller, metrics, naming, nodewatch
from llmop.kube import Kube
from llmop.observe import BatchJobView, PodView, ServingView, batch_job_view, deployment_view, pod_view
from llmop.planner import errors
from llmop.search import handlers as _search  # noqa: F401 - Kopf registers the search handlers on import
from llmop.settings import Settings
from llmop.wakeup import sleep_until_woken
from llmop_contract.api.v1alpha1.job import GROUP, PLURAL, VERSION
from llmop_contract.api.v1alpha1.status import JobState
from llmop_contract.api.v1alpha1.workload import SchedulingSpec

SETTINGS = Settings.from_env()
_wakeups: dict[tuple[str, str], asyncio.Event] = {}
_kube: Kube | None = None


def _wake(namespace: str | None, job: str | None) -> None:
    if namespace and job and (event := _wakeups.get((namespace, job))):
        event.set()


nodewatch.use_wakeup(_wake)  # node events wake the jobs with workers on the node


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _kube
    # Handler progress lives in annotations, so status holds only what the API documents.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.INFO
    # Kopf logs every handler call at INFO: one line per pod event, thousands a minute at scale.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # No watching of CRDs and Namespaces: the served resources are known, so the operator needs no
    # cluster-wide read of either (least-privilege RBAC, helm/llmop); restart it after adding a CRD.
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    # API calls run in threads; creating a 128-worker gang at once needs more than the default few.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=32))
    _kube = Kube()


# -- observations -----------------------------------------------------------------------------
@kopf.index("pods", labels={naming.JOB_NAME_LABEL: kopf.PRESENT, naming.ROLE_LABEL: naming.ROLE_WORKER})
async def worker_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Any, PodView]:
    return {(namespace, labels[naming.JOB_NAME_LABEL]): pod_view(body)}


def _batch_role(value: str | None, **_: Any) -> bool:
    return value in (naming.ROLE_COMPRESS, naming.ROLE_PREPARE)


@kopf.index("pods", labels={naming.JOB_NAME_LABEL: kopf.PRESENT, naming.ROLE_LABEL: _batch_role})
async def compress_pods(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Any, PodView]:
    # Only for their termination messages: a compression stage reports its figures there, and a
    # preparation or compression pod that refuses its input (exit 2) says why (stage "" = prepare).
    return {(namespace, labels[naming.JOB_NAME_LABEL]): pod_view(body)}


@kopf.index("batch", "v1", "jobs", labels={naming.JOB_NAME_LABEL: kopf.PRESENT})
async def batch_jobs(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Any, BatchJobView]:
    key = (namespace, labels[naming.JOB_NAME_LABEL], labels.get(naming.ROLE_LABEL, ""))
    return {key: batch_job_view(body)}


@kopf.index("apps", "v1", "deployments", labels={naming.ROLE_LABEL: naming.ROLE_SERVE})
async def deployments(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Any, ServingView] | None:
    job = labels.get(naming.JOB_NAME_LABEL)
    return {(namespace, job): deployment_view(body)} if job else None


@kopf.index("nodes")
async def nodes(body: kopf.Body, **_: Any) -> dict[None, capacity.NodeView]:
    return {None: capacity.NodeView.from_node(body)}


@kopf.index("pods", when=lambda status, **_: status.get("phase") in (None, "Pending", "Running"))
async def resource_usage(spec: kopf.Spec, **_: Any) -> dict[None, tuple[str | None, dict[str, float]]] | None:
    if spec.get("schedulingGates"):
        return None  # gated pods hold nothing yet
    return {None: (spec.get("nodeName"), capacity.requests_of(spec))}


@kopf.on.event("pods", labels={naming.JOB_NAME_LABEL: kopf.PRESENT})
@kopf.on.event("batch", "v1", "jobs", labels={naming.JOB_NAME_LABEL: kopf.PRESENT})
@kopf.on.event("apps", "v1", "deployments", labels={naming.JOB_NAME_LABEL: kopf.PRESENT})
async def child_changed(namespace: str | None, labels: kopf.Labels, **_: Any) -> None:
    _wake(namespace, labels.get(naming.JOB_NAME_LABEL))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def job_changed(namespace: str | None, name: str | None, **_: Any) -> None:
    _wake(namespace, name)


# -- the per-job loop -------------------------------------------------------------------------
@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10)
async def run_job(
    name: str,
    namespace: str | None,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    # Kopf passes every index by its function's name.
    indexes = controller.Indexes(**{f.name: kwargs[f.name] for f in dataclasses.fields(controller.Indexes)})
    assert _kube is not None and namespace is not None
    key = (namespace, name)
    wake = _wakeups.setdefault(key, asyncio.Event())
    memory = controller.JobMemory()
    spec = body.get("spec", {})
    metrics.job_info(
        namespace,
        name,
        spec.get("workers", {}).get("numNodes", 1),
        spec.get("workers", {}).get("gpusPerNode", 1),
    )
    try:
        while not stopped:
            wake.clear()
            try:
                delay = await controller.reconcile_once(
                    _kube, body, memory, indexes, SETTINGS.progress_interval_seconds
                )
            except Exception:
                # Failed actions are reported on the job by reconcile_once; this is the rest (the
                # status write itself failing, the API unreachable): logged, retried with backoff.
                metrics.RECONCILE_ERRORS.labels(namespace).inc()
                memory.error_streak += 1
                logger.exception("reconcile failed; retrying")
                memory.status = None  # re-read the stored status: our copy may not have been written
                delay = errors.backoff(memory.error_streak)
            timeout = min(delay or SETTINGS.resync_seconds, SETTINGS.resync_seconds)
            if memory.status is not None and memory.status.state == JobState.RUNNING:
                timeout = min(timeout, SETTINGS.progress_interval_seconds)
            # Sleep until a child or the job changes, the operator stops, or the resync is due.
            await sleep_until_woken(wake, stopped, timeout)
    finally:
        _wakeups.pop(key, None)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
async def job_deleted(
    namespace: str | None, name: str | None, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> None:
    # Children go with the job through their ownerReferences; only our own series remain to drop.
    if not (namespace and name):
        return
    metrics.forget(namespace, name)
    scheduling = SchedulingSpec.model_validate(dict(spec.get("scheduling") or {}))
    if scheduling.kueue_queue is not None and (attempt := status.get("attempt")):
        # Except the Kueue Workload of the gang's pod group: Kueue owns it (its owners are the pods),
        # and its finalizer keeps the pods the garbage collector deletes until the Workload is
        # finished or deleted. Deleting it stops and releases the pods and the quota at once.
        assert _kube is not None
        await controller.delete_workload(_kube, namespace, naming.kueue_pod_group(name, int(attempt)))
