"""One reconcile pass of a search: observe its jobs, plan, record the plan in status, then act."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from llmop import conditions as cond
from llmop import events
from llmop.kube import ChildConflict, ChildError, Kube
from llmop.search import builders, metrics, planner, records, space
from llmop.search.observe import JobView
from llmop_contract.api.v1alpha1.job import GROUP, VERSION
from llmop_contract.api.v1alpha1.search import PLURAL, LLMHyperparameterSearchSpec
from llmop_contract.api.v1alpha1.search_status import LLMHyperparameterSearchStatus
from llmop_contract.api.v1alpha1.status import ConditionStatus


@dataclass
class SearchMemory:
    """What one search's daemon keeps between passes.

    The daemon is the only writer of its search's status, so the status it last wrote is the truth;
    the watched body may lag behind that write and must not be used to decide the next trial.
    """

    status: LLMHyperparameterSearchStatus | None = None
    done: dict[tuple[str, Any], float] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)

    def not_recently(self, action: str, items: list[Any], window: float = 15.0) -> list[Any]:
        """Items not acted on within ``window`` seconds: the watch lags our own creates and deletes,
        and repeating them every pass would only collect 409s and 404s."""
        now = time.monotonic()
        fresh = [i for i in items if now - self.done.get((action, i), -window) >= window]
        for i in fresh:
            self.done[(action, i)] = now
        return fresh


def _error_text(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"spec.{where}: {error['msg'].removeprefix('Value error, ')}" if where else error["msg"]


async def patch_status(kube: Kube, namespace: str, name: str, status: LLMHyperparameterSearchStatus) -> None:
    body = {"status": status.to_wire()}  # the one place the typed status becomes a manifest again

    def call() -> None:
        try:
            kube.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, body)
        except ApiException as e:
            if e.status != 404:  # deleted meanwhile: nothing to report to
                raise

    await asyncio.to_thread(call)


async def reconcile_once(
    kube: Kube, body: kopf.Body, memory: SearchMemory, jobs: list[JobView]
) -> float | None:
    """One pass; returns seconds until the next pass is due without events (None: resync default)."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    generation = meta.get("generation", 1)
    status = memory.status
    if status is None:  # parsed once: later passes start from the status this daemon wrote
        status = LLMHyperparameterSearchStatus.model_validate(dict(body.get("status") or {}))
    now = datetime.now(UTC)
    try:
        spec = LLMHyperparameterSearchSpec.model_validate(body.get("spec", {}))
    except ValidationError as exc:
        result = planner.reject(status, generation, now, _error_text(exc))
        await write(kube, body, status, result, memory)
        return None
    # Trials of an earlier search of the same name are not ours: the create over them removes them
    # first (``kube.Leftover``), and until then they count for nothing.
    jobs = [j for j in jobs if j.owner_uid == meta["uid"]]
    search = planner.SearchSnapshot(name, namespace, meta["uid"], generation, spec, status)
    seen = planner.Observed(jobs=jobs, now=now, rejected=dict(memory.rejected))
    # Sampling (GaussianProcess fits a model) must not block Kopf's event loop.
    result = await asyncio.to_thread(planner.plan, search, seen)
    # Status first: a trial is in status before its job exists (see planner).
    await write(kube, body, status, result, memory)
    await act(kube, builders.SearchRef(name, namespace, meta["uid"]), spec, result, memory)
    return result.requeue_after


async def write(
    kube: Kube,
    body: kopf.Body,
    before: LLMHyperparameterSearchStatus,
    result: planner.Plan,
    memory: SearchMemory,
) -> None:
    meta = body["metadata"]
    if result.status != before:
        await patch_status(kube, meta["namespace"], meta["name"], result.status)
    memory.status = result.status
    posts = [
        events.post(
            kube, body, t.reason, t.message, t.status == ConditionStatus.TRUE and t.type == cond.FAILED
        )
        for t in result.transitions
    ]
    posts += [events.post(kube, body, reason, message, warning) for warning, reason, message in result.events]
    await asyncio.gather(*posts)
    metrics.update(meta["namespace"], meta["name"], result.status)


async def act(
    kube: Kube,
    ref: builders.SearchRef,
    spec: LLMHyperparameterSearchSpec,
    result: planner.Plan,
    memory: SearchMemory,
) -> None:
    by_index = {r.index: r for r in result.status.trials}
    manifests = [
        builders.build_trial(ref, i, by_index[i].parameters, space.trial_spec(spec, by_index[i].parameters))
        for i in memory.not_recently("create", result.create)
    ]
    if result.create_best and memory.not_recently("create", ["best"]):
        best = records.best(list(by_index.values()), spec.objective.direction)
        assert best is not None
        values = best.parameters
        manifests.append(
            builders.build_best(ref, values, space.trial_spec(spec, values, keep_lifecycle=True))
        )
    outcomes = await asyncio.gather(*(kube.create(m) for m in manifests), return_exceptions=True)
    first: BaseException | None = None
    for manifest, outcome in zip(manifests, outcomes, strict=True):
        labels = manifest["metadata"]["labels"]
        index = int(labels.get(builders.TRIAL_INDEX_LABEL, "-1"))
        if isinstance(outcome, ChildError | ChildConflict) and (
            isinstance(outcome, ChildConflict) or outcome.permanent
        ):
            # The apiserver refused the job (a rule the models could not check), or its name is
            # held by a job this search does not own: the trial fails, with the API's message.
            memory.rejected[index] = f"the apiserver rejected the trial's job: {outcome}"
        elif isinstance(outcome, BaseException):
            # Transient, or a leftover being removed: created again on a later pass.
            memory.done.pop(("create", "best" if index < 0 else index), None)
            first = first or outcome
    if first is not None:
        raise first
    deletes = memory.not_recently("delete", result.delete)
    await asyncio.gather(*(kube.delete_job(ref.namespace, n) for n in deletes))
