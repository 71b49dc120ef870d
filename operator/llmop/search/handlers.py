"""Kopf entry points of LLMHyperparameterSearch: an index of trial jobs, one daemon per search.

Registered by importing this module (``llmop.handlers`` does). Kopf settings (finalizer, progress
storage) are the operator's, set once in ``llmop.handlers.configure``.

The search controller (and with it Optuna, some 15 MB of modules) is imported by the first search's
daemon, not here: an operator that runs no search never loads it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from llmop.kube import Kube
from llmop.search import metrics
from llmop.search.builders import SEARCH_LABEL
from llmop.search.observe import JobView, job_view
from llmop.settings import Settings
from llmop.wakeup import sleep_until_woken
from llmop_contract.api.v1alpha1.job import GROUP, VERSION
from llmop_contract.api.v1alpha1.job import PLURAL as JOB_PLURAL
from llmop_contract.api.v1alpha1.search import PLURAL

SETTINGS = Settings.from_env()
_wakeups: dict[tuple[str, str], asyncio.Event] = {}
_kube: Kube | None = None


def _wake(namespace: str | None, search: str | None) -> None:
    if namespace and search and (event := _wakeups.get((namespace, search))):
        event.set()


@kopf.index(GROUP, VERSION, JOB_PLURAL, labels={SEARCH_LABEL: kopf.PRESENT})
async def search_jobs(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Any, JobView]:
    return {(namespace, labels[SEARCH_LABEL]): job_view(body)}


@kopf.on.event(GROUP, VERSION, JOB_PLURAL, labels={SEARCH_LABEL: kopf.PRESENT})
async def search_job_changed(namespace: str | None, labels: kopf.Labels, **_: Any) -> None:
    _wake(namespace, labels.get(SEARCH_LABEL))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def search_changed(namespace: str | None, name: str | None, **_: Any) -> None:
    _wake(namespace, name)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10)
async def run_search(
    name: str,
    namespace: str | None,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    from llmop.search import controller  # Optuna loads with the first search (module docstring)

    search_jobs: kopf.Index[Any, JobView] = kwargs["search_jobs"]  # Kopf passes indexes by name
    global _kube
    if _kube is None:
        _kube = Kube()
    assert namespace is not None
    key = (namespace, name)
    wake = _wakeups.setdefault(key, asyncio.Event())
    memory = controller.SearchMemory()
    try:
        while not stopped:
            wake.clear()
            try:
                jobs = list(search_jobs.get(key, []))
                delay = await controller.reconcile_once(_kube, body, memory, jobs)
            except Exception:
                # memory.status changes only after a successful status write, so it stays the truth.
                logger.exception("search reconcile failed; retrying")
                delay = 2.0
            timeout = min(delay or SETTINGS.resync_seconds, SETTINGS.resync_seconds)
            await sleep_until_woken(wake, stopped, timeout)
    finally:
        _wakeups.pop(key, None)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def search_deleted(namespace: str | None, name: str | None, **_: Any) -> None:
    # Trials go with the search through their ownerReferences; only our own series remain to drop.
    if namespace and name:
        metrics.forget(namespace, name)
